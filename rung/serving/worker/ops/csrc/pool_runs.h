// What both attention kernels take and check the same way: q and the pool's key / value views, and each
// sequence's context as runs of pool slots.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rung {

// q [tokens, heads, head_dim]; keys [kv_heads, head_dim, slots] and values [kv_heads, slots, head_dim], one CPU
// dtype, rows contiguous, heads a multiple of kv_heads.
inline void check_pool(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 3 && values.dim() == 3, "q, keys and values must be 3-d");
  TORCH_CHECK(q.device().is_cpu() && keys.device().is_cpu() && values.device().is_cpu(), "a CPU kernel");
  TORCH_CHECK(keys.scalar_type() == q.scalar_type() && values.scalar_type() == q.scalar_type(), "one dtype");
  TORCH_CHECK(keys.stride(2) == 1 && values.stride(2) == 1, "the pool's innermost dimension must be contiguous");
  TORCH_CHECK(keys.size(0) > 0 && q.size(1) % keys.size(0) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(keys.size(1) == q.size(2) && values.size(2) == q.size(2) && values.size(0) == keys.size(0),
              "keys [kv_heads, head_dim, slots] and values [kv_heads, slots, head_dim]");
}

// Sequence s's context is runs offsets[s] .. offsets[s+1]-1, run k covering slots starts[k] .. starts[k] +
// lengths[k] - 1 in context order: as contiguous int64 tensors, checked to lie in a pool of `slots` slots.
struct Runs {
  at::Tensor starts, lengths, offsets;
  const int64_t *start, *length, *offset;

  Runs(const at::Tensor& starts_, const at::Tensor& lengths_, const at::Tensor& offsets_, int64_t sequences,
       int64_t slots)
      : starts(starts_.to(at::kLong).contiguous()), lengths(lengths_.to(at::kLong).contiguous()),
        offsets(offsets_.to(at::kLong).contiguous()), start(starts.data_ptr<int64_t>()),
        length(lengths.data_ptr<int64_t>()), offset(offsets.data_ptr<int64_t>()) {
    TORCH_CHECK(offsets.numel() == sequences + 1, "offsets needs one entry per sequence plus one");
    TORCH_CHECK(lengths.numel() == starts.numel(), "starts and lengths need one entry per run");
    for (int64_t k = 0; k < starts.numel(); ++k)
      TORCH_CHECK(start[k] >= 0 && length[k] >= 0 && start[k] + length[k] <= slots, "a run outside the pool");
    for (int64_t s = 0; s < sequences; ++s)
      TORCH_CHECK(offset[s] <= offset[s + 1] && offset[s + 1] <= starts.numel(), "offsets out of order");
  }
};

}  // namespace rung
