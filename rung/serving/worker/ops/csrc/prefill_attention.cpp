// Causal attention of a step's prefill chunks (spans of several tokens) over rung's paged KV pool, every span in
// one call.
//
// In PyTorch a chunk's attention is a Python loop over tiles of query rows, each a score matrix materialised over
// every key it can see, a masked fill, a softmax pass and a second product: per-tile dispatch and three passes of
// memory traffic over scores the arithmetic reads once. Here each (span, KV head, tile of query rows) walks its keys
// in blocks, flash-attention style: a block's scores stay in L1, the softmax is kept online (a running max and sum
// per query row), and key blocks past the tile's last row are never read.
//
// The query heads that share a KV head are rows of one tile, so each key and value is loaded once for the whole
// group (any GQA ratio). Key blocks are cut at fixed context positions and every sum runs in context order, so a
// request's result is the same wherever the KV manager put its blocks and whatever else is in the step.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pool_runs.h"
#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace rung {
namespace {

constexpr int64_t kTileRows = 16;  // positions per query tile (times the group's heads: the tile's query rows)
constexpr int64_t kKeyBlock = 2 * kLanes;  // keys per block: one score row of a block is two vectors
constexpr int64_t kRowBlock = 8;  // query rows whose accumulators sit in registers together (8 x 2 vectors)

const IntVec lane_index = [] {
  IntVec v;
  for (int64_t l = 0; l < kLanes; ++l) v[l] = static_cast<int32_t>(l);
  return v;
}();

// One run of consecutive pool slots covering context positions [position, position + length).
struct Piece {
  int64_t position, slot, length;
};

// scores[m, j] = q_m . k_j for rows m < rows (q is [rows padded to kRowBlock, head_dim]) and the n <= kKeyBlock
// keys at slot.. of one run; keys are stored [head_dim, slots], so a feature's keys are a contiguous row.
template <typename T, bool Full>
void score_piece(const float* q, int64_t rows, int64_t head_dim, const T* keys, int64_t key_row_stride, int64_t n,
                 float* scores) {
  for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
    Vec acc[kRowBlock][2] = {};
    const float* qb = q + m0 * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) {
      const T* src = keys + d * key_row_stride;
      const Vec k0 = load<T, Full>(src, n), k1 = load<T, Full>(src + kLanes, n - kLanes);
      for (int64_t r = 0; r < kRowBlock; ++r) {
        const float x = qb[r * head_dim + d];
        acc[r][0] += x * k0;
        acc[r][1] += x * k1;
      }
    }
    for (int64_t r = 0; r < kRowBlock && m0 + r < rows; ++r) store<2>(acc[r], n, scores + (m0 + r) * kKeyBlock);
  }
}

// out[m, :] += sum over the n keys of probs[m, j] * v_j, the values at slot.. of one run (rows [slots, head_dim]).
template <typename T>
void value_piece(const float* probs, int64_t rows, const T* values, int64_t value_row_stride, int64_t n,
                 int64_t head_dim, float* out) {
  for (int64_t d0 = 0; d0 < head_dim; d0 += 2 * kLanes) {
    const int64_t width = std::min(2 * kLanes, head_dim - d0);
    const bool full = width == 2 * kLanes;
    for (int64_t m0 = 0; m0 < rows; m0 += kRowBlock) {
      const int64_t block_rows = std::min(kRowBlock, rows - m0);
      Vec acc[kRowBlock][2] = {};
      for (int64_t r = 0; r < block_rows; ++r) {
        const float* o = out + (m0 + r) * head_dim + d0;
        acc[r][0] = full ? load<float, true>(o, kLanes) : load<float, false>(o, width);
        acc[r][1] = full ? load<float, true>(o + kLanes, kLanes) : load<float, false>(o + kLanes, width - kLanes);
      }
      for (int64_t j = 0; j < n; ++j) {
        const T* src = values + j * value_row_stride + d0;
        const Vec v0 = full ? load<T, true>(src, kLanes) : load<T, false>(src, width);
        const Vec v1 = full ? load<T, true>(src + kLanes, kLanes) : load<T, false>(src + kLanes, width - kLanes);
        for (int64_t r = 0; r < kRowBlock; ++r) {
          const float p = probs[(m0 + r) * kKeyBlock + j];
          acc[r][0] += p * v0;
          acc[r][1] += p * v1;
        }
      }
      for (int64_t r = 0; r < block_rows; ++r) store<2>(acc[r], width, out + (m0 + r) * head_dim + d0);
    }
  }
}

// One tile: `positions` consecutive query positions from `first_position` times `group` heads (row m = position
// offset m / group, head m % group), q as floats [rows padded, head_dim]; out [rows, head_dim], unnormalised until
// the end.
template <typename T>
void attend_tile(const float* q, int64_t group, int64_t positions, int64_t first_position, int64_t head_dim,
                 const T* keys, int64_t key_row_stride, const T* values, int64_t value_row_stride,
                 const std::vector<Piece>& pieces, std::vector<float>& scores, float* out) {
  const int64_t rows = positions * group;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  std::vector<float> top(rows, kNegInf), total(rows, 0.0f);
  std::fill(out, out + rows * head_dim, 0.0f);
  scores.resize(((rows + kRowBlock - 1) / kRowBlock) * kRowBlock * kKeyBlock);
  const int64_t visible = first_position + positions;  // keys 0 .. visible - 1: the last row's context
  int64_t block_piece = 0;  // the piece holding the current block's first key
  for (int64_t block = 0; block < visible; block += kKeyBlock) {
    const int64_t keys_in_block = std::min(kKeyBlock, visible - block);
    while (pieces[block_piece].position + pieces[block_piece].length <= block) ++block_piece;
    // the block's keys, piece by piece (a block crosses a run boundary where the pool's blocks are not consecutive)
    for (int64_t done = 0, piece = block_piece; done < keys_in_block; ++piece) {
      const Piece& p = pieces[piece];
      const int64_t offset = block + done - p.position, n = std::min(keys_in_block - done, p.length - offset);
      float* s = scores.data() + done;  // this piece's columns of the block
      if (n == kKeyBlock) {
        score_piece<T, true>(q, rows, head_dim, keys + p.slot + offset, key_row_stride, n, s);
      } else {
        score_piece<T, false>(q, rows, head_dim, keys + p.slot + offset, key_row_stride, n, s);
      }
      done += n;
    }
    // online softmax: the new running max, what was accumulated rescaled, this block's numerators (0 where masked)
    for (int64_t m = 0; m < rows; ++m) {
      float* row = scores.data() + m * kKeyBlock;
      const int32_t seen = static_cast<int32_t>(
          std::clamp<int64_t>(first_position + m / group + 1 - block, 0, keys_in_block));  // causal limit
      const auto visible0 = lane_index < seen, visible1 = lane_index + static_cast<int32_t>(kLanes) < seen;
      const Vec s0 = visible0 ? load<float, true>(row, kLanes) : splat(kNegInf);
      const Vec s1 = visible1 ? load<float, true>(row + kLanes, kLanes) : splat(kNegInf);
      const float new_top = std::max(top[m], horizontal_max(s0 > s1 ? s0 : s1));
      const float rescale = top[m] == kNegInf ? 0.0f : fast_exp(top[m] - new_top);
      const Vec e[2] = {visible0 ? vector_exp(s0 - new_top) : Vec{}, visible1 ? vector_exp(s1 - new_top) : Vec{}};
      store<2>(e, kKeyBlock, row);
      total[m] = total[m] * rescale + horizontal_sum(e[0] + e[1]);
      top[m] = new_top;
      if (rescale != 1.0f) {
        float* o = out + m * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) o[d] *= rescale;
      }
    }
    for (int64_t done = 0, piece = block_piece; done < keys_in_block; ++piece) {
      const Piece& p = pieces[piece];
      const int64_t offset = block + done - p.position, n = std::min(keys_in_block - done, p.length - offset);
      value_piece<T>(scores.data() + done, rows, values + (p.slot + offset) * value_row_stride, value_row_stride, n,
                     head_dim, out);
      done += n;
    }
  }
  for (int64_t m = 0; m < rows; ++m) {
    const float inverse = 1.0f / total[m];
    for (int64_t d = 0; d < head_dim; ++d) out[m * head_dim + d] *= inverse;
  }
}

// q [tokens, heads, head_dim], already scaled; keys [kv_heads, head_dim, slots] and values [kv_heads, slots,
// head_dim], views of the pool. Span s is rows firsts[s] .. firsts[s] + counts[s] - 1 of q, the newest counts[s]
// positions of a context made of runs offsets[s] .. offsets[s+1]-1 (run k: slots starts[k] .. starts[k] +
// lengths[k] - 1, in context order). Writes those rows of out [tokens, heads, head_dim]; other rows are untouched.
void prefill_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                       const at::Tensor& firsts, const at::Tensor& counts, const at::Tensor& starts,
                       const at::Tensor& lengths, const at::Tensor& offsets, at::Tensor out) {
  check_pool(q, keys, values);
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && out.sizes() == q.sizes() && out.is_contiguous(),
              "out must be a contiguous tensor shaped like q, of its dtype");
  const int64_t tokens = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = keys.size(0);
  const at::Tensor first_of = firsts.to(at::kLong).contiguous(), count_of = counts.to(at::kLong).contiguous();
  const int64_t spans = first_of.numel();
  TORCH_CHECK(count_of.numel() == spans, "firsts and counts need one entry per span");
  const Runs runs(starts, lengths, offsets, spans, keys.size(2));
  const int64_t *first = first_of.data_ptr<int64_t>(), *count = count_of.data_ptr<int64_t>();
  const int64_t *start = runs.start, *length = runs.length, *offset = runs.offset;
  const at::Tensor query = q.contiguous();
  // each span's runs as pieces of context positions, and one task per (span, KV head, tile of positions)
  std::vector<std::vector<Piece>> pieces(spans);
  std::vector<int64_t> contexts(spans, 0);
  std::vector<int64_t> task_span, task_tile;
  for (int64_t s = 0; s < spans; ++s) {
    for (int64_t k = offset[s]; k < offset[s + 1]; ++k) {
      if (length[k] > 0) pieces[s].push_back({contexts[s], start[k], length[k]});
      contexts[s] += length[k];
    }
    TORCH_CHECK(count[s] >= 1 && count[s] <= contexts[s], "a span's rows must be the newest of its context");
    TORCH_CHECK(first[s] >= 0 && first[s] + count[s] <= tokens, "a span's rows outside q");
    for (int64_t tile = 0; tile < count[s]; tile += kTileRows) {
      task_span.push_back(s);
      task_tile.push_back(tile);
    }
  }
  const int64_t group = heads / kv_heads;
  const int64_t tasks = static_cast<int64_t>(task_span.size()) * kv_heads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "prefill_attention", [&] {
    const scalar_t* q_data = query.data_ptr<scalar_t>();
    const scalar_t* k_data = keys.data_ptr<scalar_t>();
    const scalar_t* v_data = values.data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, tile_q, tile_out;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t index = task / kv_heads, h = task % kv_heads;
        const int64_t s = task_span[index], tile = task_tile[index];
        const int64_t positions = std::min(kTileRows, count[s] - tile);
        const int64_t rows = positions * group, padded = (rows + kRowBlock - 1) / kRowBlock * kRowBlock;
        tile_q.assign(padded * head_dim, 0.0f);
        tile_out.resize(rows * head_dim);
        for (int64_t i = 0; i < positions; ++i) {
          const scalar_t* src = q_data + ((first[s] + tile + i) * heads + h * group) * head_dim;
          for (int64_t e = 0; e < group * head_dim; ++e) tile_q[i * group * head_dim + e] = static_cast<float>(src[e]);
        }
        attend_tile<scalar_t>(tile_q.data(), group, positions, contexts[s] - count[s] + tile, head_dim,
                              k_data + h * keys.stride(0), keys.stride(1), v_data + h * values.stride(0),
                              values.stride(1), pieces[s], scores, tile_out.data());
        for (int64_t i = 0; i < positions; ++i) {
          scalar_t* dst = out_data + ((first[s] + tile + i) * heads + h * group) * head_dim;
          for (int64_t e = 0; e < group * head_dim; ++e) dst[e] = static_cast<scalar_t>(tile_out[i * group * head_dim + e]);
        }
      }
    });
  });
}

}  // namespace
}  // namespace rung

TORCH_LIBRARY_FRAGMENT(rung, m) {
  m.def("prefill_attention(Tensor q, Tensor keys, Tensor values, Tensor firsts, Tensor counts, Tensor starts, "
        "Tensor lengths, Tensor offsets, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(rung, CPU, m) {
  m.impl("prefill_attention", &rung::prefill_attention);
}
