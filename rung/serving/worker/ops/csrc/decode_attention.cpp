// Decode attention over rung's paged KV pool: every single-token span of a step in one call.
//
// In PyTorch a decode's attention is three small operators per layer per request, each paying ~15 us of dispatch
// on a CPU: at 64 requests that is half of a decode step. Here one call walks each request's runs of pool slots.
//
// The arithmetic of a request depends only on its own context in order — scores go into a buffer indexed by context
// position and every sum runs in context order — so the result is the same wherever the KV manager put its blocks
// and whatever else is in the batch (the engine's deterministic mode relies on it).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pool_runs.h"
#include "vec_math.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace rung {
namespace {

constexpr int64_t kMaxGroup = 8;  // query heads computed together over one pass of a KV head's context

// scores[g, l] = q_g . k_l for the n <= W * kLanes positions of one block. Keys are stored [head_dim, slots], so
// a block is a short contiguous row per feature, read once for all G query heads; its G * W independent
// accumulators stay in registers, which keeps the FMA units busy rather than waiting on one chain.
template <typename T, int64_t G, int64_t W, bool Full>
inline void score_block(const float* q, int64_t head_dim, const T* keys, int64_t key_row_stride, int64_t n,
                        float* scores, int64_t context) {
  Vec acc[G][W] = {};
  for (int64_t d = 0; d < head_dim; ++d) {
    const T* src = keys + d * key_row_stride;
    Vec k[W];
    for (int64_t w = 0; w < W; ++w) k[w] = load<T, Full>(src + w * kLanes, n - w * kLanes);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t w = 0; w < W; ++w) acc[g][w] += q[g * head_dim + d] * k[w];
  }
  for (int64_t g = 0; g < G; ++g) store<W>(acc[g], n, scores + g * context);
}

// out[g, l] = sum over the context, in order, of p[g, c] * v_c[l] for the n <= W * kLanes features of one block.
template <typename T, int64_t G, int64_t W, bool Full>
inline void value_block(const float* probs, int64_t context, const T* values, int64_t value_row_stride,
                        const int64_t* starts, const int64_t* lengths, int64_t runs, int64_t n, float* out,
                        int64_t head_dim) {
  Vec acc[G][W] = {};
  for (int64_t run = 0, offset = 0; run < runs; offset += lengths[run], ++run) {
    for (int64_t i = 0; i < lengths[run]; ++i) {
      const T* src = values + (starts[run] + i) * value_row_stride;
      Vec v[W];
      for (int64_t w = 0; w < W; ++w) v[w] = load<T, Full>(src + w * kLanes, n - w * kLanes);
      for (int64_t g = 0; g < G; ++g)
        for (int64_t w = 0; w < W; ++w) acc[g][w] += probs[g * context + offset + i] * v[w];
    }
  }
  for (int64_t g = 0; g < G; ++g) store<W>(acc[g], n, out + g * head_dim);
}

// G <= kMaxGroup query heads (q scaled, as floats) over one KV head's context.
template <typename T, int64_t G>
void attend_heads(const float* q, int64_t head_dim, const T* keys, int64_t key_row_stride,
                  const T* values, int64_t value_row_stride, const int64_t* starts, const int64_t* lengths,
                  int64_t runs, int64_t context, std::vector<float>& scores, float* out) {
  scores.resize(G * context);
  constexpr int64_t W = G <= 4 ? 2 : 1;  // vectors per block: as many accumulators as registers allow
  constexpr int64_t block = W * kLanes;
  for (int64_t run = 0, offset = 0; run < runs; offset += lengths[run], ++run) {
    for (int64_t i = 0; i < lengths[run]; i += block) {
      const int64_t n = std::min(block, lengths[run] - i);
      (n == block ? score_block<T, G, W, true> : score_block<T, G, W, false>)(
          q, head_dim, keys + starts[run] + i, key_row_stride, n, scores.data() + offset + i, context);
    }
  }
  float inverse[G];
  for (int64_t g = 0; g < G; ++g) {  // softmax numerators in place, and 1 / denominator
    float* row = scores.data() + g * context;
    float top = row[0];
    for (int64_t c = 1; c < context; ++c) top = std::max(top, row[c]);
    float partial[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= context; c += kLanes) {
      for (int64_t lane = 0; lane < kLanes; ++lane) {
        row[c + lane] = fast_exp(row[c + lane] - top);
        partial[lane] += row[c + lane];
      }
    }
    for (; c < context; ++c) {
      row[c] = fast_exp(row[c] - top);
      partial[c % kLanes] += row[c];
    }
    float total = 0.0f;
    for (int64_t lane = 0; lane < kLanes; ++lane) total += partial[lane];
    inverse[g] = 1.0f / total;
  }
  for (int64_t d = 0; d < head_dim; d += block) {
    const int64_t n = std::min(block, head_dim - d);
    (n == block ? value_block<T, G, W, true> : value_block<T, G, W, false>)(
        scores.data(), context, values + d, value_row_stride, starts, lengths, runs, n, out + d, head_dim);
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < head_dim; ++d) out[g * head_dim + d] *= inverse[g];
}

// attend_heads for a group size known only at run time.
template <typename T>
void attend_group(int64_t group, const float* q, int64_t head_dim, const T* keys, int64_t key_row_stride,
                  const T* values, int64_t value_row_stride, const int64_t* starts, const int64_t* lengths,
                  int64_t runs, int64_t context, std::vector<float>& scores, float* out) {
  using Fn = void (*)(const float*, int64_t, const T*, int64_t, const T*, int64_t, const int64_t*, const int64_t*,
                      int64_t, int64_t, std::vector<float>&, float*);
  static constexpr Fn by_group[kMaxGroup] = {attend_heads<T, 1>, attend_heads<T, 2>, attend_heads<T, 3>,
                                             attend_heads<T, 4>, attend_heads<T, 5>, attend_heads<T, 6>,
                                             attend_heads<T, 7>, attend_heads<T, 8>};
  by_group[group - 1](q, head_dim, keys, key_row_stride, values, value_row_stride, starts, lengths, runs, context,
                      scores, out);
}

// q [requests, heads, head_dim], already scaled; keys [kv_heads, head_dim, slots] and values [kv_heads, slots,
// head_dim], views of the pool; request r's context is runs offsets[r] .. offsets[r+1]-1, run k covering slots
// starts[k] .. starts[k] + lengths[k] - 1 in context order. Returns [requests, heads, head_dim].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& starts, const at::Tensor& lengths, const at::Tensor& offsets) {
  check_pool(q, keys, values);
  const int64_t requests = q.size(0), heads = q.size(1), head_dim = q.size(2), kv_heads = keys.size(0);
  const Runs runs(starts, lengths, offsets, requests, keys.size(2));
  const int64_t *start = runs.start, *length = runs.length, *offset = runs.offset;
  const at::Tensor query = q.contiguous();
  at::Tensor out = at::empty_like(query);
  const int64_t group = heads / kv_heads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    const scalar_t* q_data = query.data_ptr<scalar_t>();
    const scalar_t* k_data = keys.data_ptr<scalar_t>();
    const scalar_t* v_data = values.data_ptr<scalar_t>();
    scalar_t* out_data = out.data_ptr<scalar_t>();
    at::parallel_for(0, requests * kv_heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores, query(group * head_dim), result(group * head_dim);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t r = task / kv_heads, h = task % kv_heads;
        const int64_t first = offset[r], runs = offset[r + 1] - first;
        int64_t context = 0;
        for (int64_t k = first; k < first + runs; ++k) context += length[k];
        const int64_t row = (r * heads + h * group) * head_dim;
        for (int64_t i = 0; i < group * head_dim; ++i) query[i] = static_cast<float>(q_data[row + i]);
        std::fill(result.begin(), result.end(), 0.0f);
        for (int64_t g = 0; g < group && context > 0; g += kMaxGroup)
          attend_group<scalar_t>(std::min(kMaxGroup, group - g), query.data() + g * head_dim, head_dim,
                                 k_data + h * keys.stride(0), keys.stride(1), v_data + h * values.stride(0),
                                 values.stride(1), start + first, length + first, runs, context, scores,
                                 result.data() + g * head_dim);
        for (int64_t i = 0; i < group * head_dim; ++i) out_data[row + i] = static_cast<scalar_t>(result[i]);
      }
    });
  });
  return out;
}

// Writes a step's new keys and values k, v [tokens, kv_heads, head_dim] into the pool views read above, token t
// at slot slots[t]: the key transposed into keys [kv_heads, head_dim, slots], the value as a row of values
// [kv_heads, slots, head_dim]. PyTorch's indexed assignment into the transposed keys is ~5x slower.
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor keys, at::Tensor values, const at::Tensor& slots) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "k and v must both be [tokens, kv_heads, head_dim]");
  TORCH_CHECK(keys.device().is_cpu() && keys.scalar_type() == k.scalar_type() &&
              values.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type(), "one CPU dtype");
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1, "the pool's innermost dimension must be contiguous");
  TORCH_CHECK(keys.size(0) == k.size(1) && keys.size(1) == k.size(2) && values.size(2) == k.size(2),
              "keys [kv_heads, head_dim, slots] and values [kv_heads, slots, head_dim]");
  const at::Tensor slot = slots.to(at::kLong).contiguous();
  const int64_t tokens = k.size(0), kv_heads = k.size(1), head_dim = k.size(2), pool = keys.size(2);
  TORCH_CHECK(slot.numel() == tokens, "one slot per token");
  const int64_t* where = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t) TORCH_CHECK(where[t] >= 0 && where[t] < pool, "a slot outside the pool");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k.scalar_type(), "write_kv", [&] {
    const scalar_t* k_data = k.data_ptr<scalar_t>();
    const scalar_t* v_data = v.data_ptr<scalar_t>();
    scalar_t* key_pool = keys.data_ptr<scalar_t>();
    scalar_t* value_pool = values.data_ptr<scalar_t>();
    // strides as locals: read through the tensors, the compiler would reload them after every store
    const int64_t k_token = k.stride(0), k_head = k.stride(1), k_dim = k.stride(2);
    const int64_t v_token = v.stride(0), v_head = v.stride(1), v_dim = v.stride(2);
    const int64_t key_head = keys.stride(0), key_row = keys.stride(1);
    const int64_t value_head = values.stride(0), value_row = values.stride(1);
    constexpr int64_t kTile = 64;  // tokens whose keys are transposed together: short contiguous rows per feature
    for (int64_t h = 0; h < kv_heads; ++h) {
      for (int64_t first = 0; first < tokens;) {
        int64_t last = first + 1;  // [first, last): consecutive tokens at consecutive slots, at most a tile
        while (last < tokens && last - first < kTile && where[last] == where[last - 1] + 1) ++last;
        for (int64_t d = 0; d < head_dim; ++d) {
          scalar_t* row = key_pool + h * key_head + d * key_row + where[first];
          const scalar_t* src = k_data + h * k_head + d * k_dim;
          for (int64_t t = first; t < last; ++t) row[t - first] = src[t * k_token];
        }
        for (int64_t t = first; t < last; ++t) {
          const scalar_t* value = v_data + t * v_token + h * v_head;
          scalar_t* dst = value_pool + h * value_head + where[t] * value_row;
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = value[d * v_dim];
        }
        first = last;
      }
    }
  });
}

}  // namespace
}  // namespace rung

TORCH_LIBRARY_FRAGMENT(rung, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor starts, Tensor lengths, Tensor offsets)"
        " -> Tensor");
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(rung, CPU, m) {
  m.impl("decode_attention", &rung::decode_attention);
  m.impl("write_kv", &rung::write_kv);
}
