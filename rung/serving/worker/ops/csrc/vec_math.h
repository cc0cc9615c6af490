// Vector loads and stores over any float dtype, and scalar math written so that loops calling it vectorize (no
// library calls, no branches): what the attention kernels share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace rung {

constexpr int64_t kLanes = 16;  // floats in one Vec: a block of positions or features, the softmax sum's lanes
// GCC/Clang vector extension: one AVX-512 register, two AVX2 ones or four NEON ones — whatever the target has
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

// kLanes values from src as floats; a partial block (Full false) reads only the first n and pads with zeros.
template <typename T, bool Full>
inline Vec load(const T* src, int64_t n) {
  Vec v;
  if constexpr (Full && std::is_same_v<T, float>) {
    std::memcpy(&v, src, sizeof v);  // one unaligned vector load
  } else {
    for (int64_t l = 0; l < kLanes; ++l) v[l] = (Full || l < n) ? static_cast<float>(src[l]) : 0.0f;
  }
  return v;
}

// The first n (at most W * kLanes) lanes of W vectors.
template <int64_t W>
inline void store(const Vec (&acc)[W], int64_t n, float* dst) {
  if (n == W * kLanes) {
    std::memcpy(dst, acc, sizeof acc);
    return;
  }
  for (int64_t w = 0; w < W; ++w)
    for (int64_t l = 0; l < kLanes && w * kLanes + l < n; ++l) dst[w * kLanes + l] = acc[w][l];
}

// Cephes' single-precision polynomial for exp(r), |r| <= ln(2) / 2, for a float or a Vec of them.
template <typename V>
inline V exp_polynomial(V r) {
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds a float to the nearest integer
constexpr int32_t kRoundShiftBits = 0x4B400000;

// exp(x) (about 1 ulp); x is clamped to [-87, 88], where float is normal. Rounding by the shift trick and bit
// casts instead of library calls: x = n ln 2 + r, exp(x) = 2^n exp(r).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float shifted = x * 1.44269504088896341f + kRoundShift;
  const float n = shifted - kRoundShift;
  int32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, 4);
  const int32_t scale_bits = (shifted_bits - kRoundShiftBits + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, 4);
  return exp_polynomial(x - n * 0.693359375f + n * 2.12194440e-4f) * scale;
}

typedef int32_t IntVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec splat(float value) { return Vec{} + value; }

// fast_exp of every lane, the same arithmetic in vector operations.
inline Vec vector_exp(Vec x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const Vec shifted = x * 1.44269504088896341f + kRoundShift;
  const Vec n = shifted - kRoundShift;
  const IntVec scale_bits = (reinterpret_cast<const IntVec&>(shifted) - kRoundShiftBits + 127) << 23;
  return exp_polynomial(x - n * 0.693359375f + n * 2.12194440e-4f) * reinterpret_cast<const Vec&>(scale_bits);
}

inline float horizontal_max(Vec v) {
  float top = v[0];
  for (int64_t l = 1; l < kLanes; ++l) top = std::max(top, v[l]);
  return top;
}

inline float horizontal_sum(Vec v) {
  float total = 0.0f;
  for (int64_t l = 0; l < kLanes; ++l) total += v[l];
  return total;
}

}  // namespace rung
