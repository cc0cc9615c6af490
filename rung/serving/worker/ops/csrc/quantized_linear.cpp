// x @ W.T for a weight stored as int8 levels (int8 or int4 values) with an fp32 scale per output row and group of
// input features. Why integers and not dequantized floats: at the batch sizes serving decodes (tens of rows) a
// CPU's float GEMM is bound by arithmetic, not by reading the weight, so fewer weight bytes alone do not make it
// faster. AVX-512 VNNI multiplies 64 int8 pairs per instruction to the float FMA's 16, so each row of x is quantized
// to int8 with its own scale (per token: a request's numbers never depend on its batch-mates), multiplied in
// integers, and every group's int32 sum scaled back to float.
//
// VNNI multiplies unsigned by signed bytes, so x's levels are stored shifted by +128 and the shift's contribution,
// 128 * (the group's sum of weight levels), is subtracted per group (`shifts`, made once at load).
//
// Without VNNI (AVX2 CPUs: AMD before Zen 4, older Intel), the same products come from AVX2's byte multiply-add
// (32 int8 pairs per two instructions to the float FMA's 8): x's levels are unshifted to signed, and each product
// is |x| times the weight level with x's sign (so the pairwise 16-bit sums, at most 2 * 127 * 127, never saturate).
// Without either, a scalar loop computes the same arithmetic, slowly (a test checks it here).
//
// Layouts, made once at load by `cpu_ops.pack_quantized`: levels [N/16, K/4, 64] bytes for int8 (16 output rows, 4
// consecutive input features per 32-bit lane: byte 4 * row + feature), [N/16, K/4, 32] for int4 (byte j holds level j
// in its low nibble and level j + 32 in its high one, so half the bytes are read); scales and shifts
// [N/16, groups, 16]. N is padded to a multiple of 16.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace rung {
namespace {

constexpr int64_t kLanes = 16;  // output rows per block: one 512-bit register of int32 or float
constexpr int kRowsPerTile = 8;  // rows of x sharing each loaded weight block
constexpr int64_t kLevels = kLanes * 4;  // levels per block and four input features

// Level `index` (byte 4 * row + feature) of a block's four input features, from either layout.
template <int Bits>
inline int32_t level(const int8_t* quad, int64_t index) {
  if constexpr (Bits == 8) {
    return quad[index];
  } else {
    const uint8_t byte = static_cast<uint8_t>(quad[index % 32]);
    const int32_t nibble = index < 32 ? byte & 0xF : byte >> 4;
    return (nibble ^ 8) - 8;  // two's complement in four bits
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// A block's 64 levels for four input features, as 64 signed bytes.
template <int Bits>
inline __m512i load_levels(const int8_t* quad) {
  if constexpr (Bits == 8) {
    return _mm512_loadu_si512(quad);
  } else {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quad));
    const __m256i low_bits = _mm256_set1_epi8(0xF);
    const __m256i low = _mm256_and_si256(packed, low_bits);
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low_bits);
    const __m512i nibbles = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
    const __m512i eight = _mm512_set1_epi8(8);
    return _mm512_sub_epi8(_mm512_xor_si512(nibbles, eight), eight);
  }
}
#elif defined(__AVX2__) && defined(__FMA__)
// A block's 64 levels for four input features as two registers of 32 signed bytes: rows 0-7, then rows 8-15.
template <int Bits>
inline void load_levels(const int8_t* quad, __m256i& low_rows, __m256i& high_rows) {
  if constexpr (Bits == 8) {
    low_rows = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quad));
    high_rows = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quad + 32));
  } else {
    const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(quad));
    const __m256i low_bits = _mm256_set1_epi8(0xF);
    const __m256i eight = _mm256_set1_epi8(8);
    low_rows = _mm256_sub_epi8(_mm256_xor_si256(_mm256_and_si256(packed, low_bits), eight), eight);
    high_rows = _mm256_sub_epi8(
        _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(packed, 4), low_bits), eight), eight);
  }
}
#endif

// Each row of x as unsigned levels (level + 128) and its scale: row max |x| / 127.
void quantize_rows(const float* x, int64_t rows, int64_t features, uint8_t* levels, float* scales) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * features;
    float largest = 0.f;
    for (int64_t k = 0; k < features; ++k) largest = std::max(largest, std::fabs(row[k]));
    const float scale = largest > 0.f ? largest / 127.f : 1.f;
    const float inverse = 1.f / scale;
    uint8_t* out = levels + r * features;
    for (int64_t k = 0; k < features; ++k) {
      out[k] = static_cast<uint8_t>(static_cast<int32_t>(std::nearbyint(row[k] * inverse)) + 128);
    }
    scales[r] = scale;
  }
}

// Rows [first, first + R) of x times one block of 16 output rows, written to out's columns [column, column + width).
template <int R, int Bits>
void tile(const int32_t* x_levels, const float* x_scales, int64_t first, int64_t quads, const int8_t* block,
          const float* scales, const int32_t* shifts, int64_t groups, float* out, int64_t out_stride, int64_t column,
          int64_t width) {
  const int64_t quads_per_group = quads / groups;
  constexpr int64_t kBytes = kLevels * Bits / 8;  // a block's bytes per four input features
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
  __m512 sums[R];
  for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512i dots[R];
    for (int r = 0; r < R; ++r) dots[r] = _mm512_setzero_si512();
    for (int64_t q = g * quads_per_group; q < (g + 1) * quads_per_group; ++q) {
      const __m512i weights = load_levels<Bits>(block + q * kBytes);
      for (int r = 0; r < R; ++r) {
        dots[r] = _mm512_dpbusd_epi32(dots[r], _mm512_set1_epi32(x_levels[(first + r) * quads + q]), weights);
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales + g * kLanes);
    const __m512i shift = _mm512_loadu_si512(shifts + g * kLanes);
    for (int r = 0; r < R; ++r) {
      sums[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(dots[r], shift)), scale, sums[r]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << width) - 1u);
  for (int r = 0; r < R; ++r) {
    const __m512 row = _mm512_mul_ps(sums[r], _mm512_set1_ps(x_scales[first + r]));
    _mm512_mask_storeu_ps(out + (first + r) * out_stride + column, mask, row);
  }
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 sums[R][2];
  for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i unshift = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t g = 0; g < groups; ++g) {
    __m256i dots[R][2];
    for (int r = 0; r < R; ++r) dots[r][0] = dots[r][1] = _mm256_setzero_si256();
    for (int64_t q = g * quads_per_group; q < (g + 1) * quads_per_group; ++q) {
      __m256i weights[2];
      load_levels<Bits>(block + q * kBytes, weights[0], weights[1]);
      for (int r = 0; r < R; ++r) {
        const __m256i x = _mm256_xor_si256(_mm256_set1_epi32(x_levels[(first + r) * quads + q]), unshift);
        const __m256i magnitude = _mm256_abs_epi8(x);
        for (int h = 0; h < 2; ++h) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(weights[h], x));
          dots[r][h] = _mm256_add_epi32(dots[r][h], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m256 scale = _mm256_loadu_ps(scales + g * kLanes + 8 * h);
      for (int r = 0; r < R; ++r) sums[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r][h]), scale, sums[r][h]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float row[kLanes];
    const __m256 x_scale = _mm256_set1_ps(x_scales[first + r]);
    _mm256_store_ps(row, _mm256_mul_ps(sums[r][0], x_scale));
    _mm256_store_ps(row + 8, _mm256_mul_ps(sums[r][1], x_scale));
    std::copy(row, row + width, out + (first + r) * out_stride + column);
  }
#else  // the same arithmetic, lane by lane
  for (int r = 0; r < R; ++r) {
    float sums[kLanes] = {};
    const uint8_t* x = reinterpret_cast<const uint8_t*>(x_levels + (first + r) * quads);
    for (int64_t g = 0; g < groups; ++g) {
      int32_t dots[kLanes] = {};
      for (int64_t q = g * quads_per_group; q < (g + 1) * quads_per_group; ++q) {
        for (int64_t lane = 0; lane < kLanes; ++lane) {
          for (int i = 0; i < 4; ++i) {
            dots[lane] += static_cast<int32_t>(x[q * 4 + i]) * level<Bits>(block + q * kBytes, lane * 4 + i);
          }
        }
      }
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        sums[lane] += static_cast<float>(dots[lane] - shifts[g * kLanes + lane]) * scales[g * kLanes + lane];
      }
    }
    for (int64_t lane = 0; lane < width; ++lane) {
      out[(first + r) * out_stride + column + lane] = sums[lane] * x_scales[first + r];
    }
  }
#endif
}

template <int R, int Bits>
void tile_up_to(int rows, const int32_t* x_levels, const float* x_scales, int64_t first, int64_t quads,
                const int8_t* block, const float* scales, const int32_t* shifts, int64_t groups, float* out,
                int64_t out_stride, int64_t column, int64_t width) {
  if constexpr (R > 1) {
    if (rows < R) {
      tile_up_to<R - 1, Bits>(rows, x_levels, x_scales, first, quads, block, scales, shifts, groups, out, out_stride, column,
                        width);
      return;
    }
  }
  tile<R, Bits>(x_levels, x_scales, first, quads, block, scales, shifts, groups, out, out_stride, column, width);
}

at::Tensor quantized_linear(const at::Tensor& x, const at::Tensor& levels, const at::Tensor& scales,
                            const at::Tensor& shifts, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float [rows, in]");
  TORCH_CHECK(levels.dim() == 3 && (levels.size(2) == kLevels || levels.size(2) == kLevels / 2) &&
                  levels.scalar_type() == at::kChar && levels.is_contiguous(),
              "levels must be int8 [out/16, in/4, 64] (int8) or [out/16, in/4, 32] (int4)");
  const bool int4 = levels.size(2) == kLevels / 2;
  TORCH_CHECK(levels.size(1) * 4 == x.size(1), "x has ", x.size(1), " features, the weight ", levels.size(1) * 4);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && shifts.scalar_type() == at::kInt && scales.is_contiguous() &&
                  shifts.is_contiguous() && scales.sizes() == shifts.sizes() && scales.size(0) == levels.size(0),
              "scales (float) and shifts (int32) must be [out/16, groups, 16]");
  TORCH_CHECK(levels.size(1) % scales.size(1) == 0, "the groups must divide the input features in fours");
  TORCH_CHECK(out_features > (levels.size(0) - 1) * kLanes && out_features <= levels.size(0) * kLanes,
              "out_features does not match the weight's blocks");
  const at::Tensor input = x.contiguous();
  const int64_t rows = input.size(0), features = input.size(1), quads = features / 4;
  const int64_t blocks = levels.size(0), groups = scales.size(1);
  at::Tensor x_levels = at::empty({rows, features}, x.options().dtype(at::kByte));
  at::Tensor x_scales = at::empty({rows}, x.options());
  at::Tensor out = at::empty({rows, out_features}, x.options());
  quantize_rows(input.data_ptr<float>(), rows, features, x_levels.data_ptr<uint8_t>(), x_scales.data_ptr<float>());
  const int32_t* x_data = reinterpret_cast<const int32_t*>(x_levels.data_ptr<uint8_t>());
  const float* x_scale_data = x_scales.data_ptr<float>();
  const int8_t* level_data = levels.data_ptr<int8_t>();
  const float* scale_data = scales.data_ptr<float>();
  const int32_t* shift_data = shifts.data_ptr<int32_t>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t width = std::min(kLanes, out_features - b * kLanes);
      for (int64_t first = 0; first < rows; first += kRowsPerTile) {
        const int n = static_cast<int>(std::min<int64_t>(kRowsPerTile, rows - first));
        const int8_t* block = level_data + b * quads * levels.size(2);
        const float* block_scales = scale_data + b * groups * kLanes;
        const int32_t* block_shifts = shift_data + b * groups * kLanes;
        if (int4) {
          tile_up_to<kRowsPerTile, 4>(n, x_data, x_scale_data, first, quads, block, block_scales, block_shifts, groups,
                                      out_data, out_features, b * kLanes, width);
        } else {
          tile_up_to<kRowsPerTile, 8>(n, x_data, x_scale_data, first, quads, block, block_scales, block_shifts, groups,
                                      out_data, out_features, b * kLanes, width);
        }
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace rung

TORCH_LIBRARY_FRAGMENT(rung, m) {
  m.def("quantized_linear(Tensor x, Tensor levels, Tensor scales, Tensor shifts, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(rung, CPU, m) {
  m.impl("quantized_linear", &rung::quantized_linear);
}
