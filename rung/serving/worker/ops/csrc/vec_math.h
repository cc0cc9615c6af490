// Scalar math written so that loops calling it vectorize (no library calls, no branches).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace rung {

// exp(x), Cephes' single-precision polynomial (about 1 ulp); x is clamped to [-87, 88], where float is normal.
// Rounding by the 1.5 * 2^23 trick and bit casts instead of library calls.
inline float fast_exp(float x) {
  constexpr float kShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifted = x * 1.44269504088896341f + kShift;
  const float n = shifted - kShift;
  int32_t shifted_bits, shift_bits;
  std::memcpy(&shifted_bits, &shifted, 4);
  std::memcpy(&shift_bits, &kShift, 4);
  const int32_t exponent = shifted_bits - shift_bits;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t scale_bits = (exponent + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return p * scale;
}

}  // namespace rung
