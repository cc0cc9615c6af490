// Fused elementwise ops of rung's layers. In PyTorch, RMSNorm is five passes over the hidden states, the rotary
// embedding six (a rotated copy, two products, a sum) and SwiGLU's silu(gate) * up three; on a 4,096-token
// prefill step each costs milliseconds of memory traffic. Here each is one pass, with the same arithmetic in float.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vec_math.h"

#include <cmath>
#include <cstdint>

namespace rung {
namespace {

// x [tokens, heads, head_dim] rotated in place (rotate-half form) by the tables cos, sin [tokens, head_dim].
void rotary_(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x must be [tokens, heads, head_dim] with contiguous rows");
  TORCH_CHECK(x.size(2) % 2 == 0, "head_dim must be even");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat, "float tables");
  const at::Tensor c = cos.reshape({x.size(0), x.size(2)}).contiguous();
  const at::Tensor s = sin.reshape({x.size(0), x.size(2)}).contiguous();
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rotary_", [&] {
    scalar_t* data = x.data_ptr<scalar_t>();
    const float* cos_data = c.data_ptr<float>();
    const float* sin_data = s.data_ptr<float>();
    at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* ct = cos_data + t * dim;
        const float* st = sin_data + t * dim;
        for (int64_t h = 0; h < heads; ++h) {
          scalar_t* row = data + t * x.stride(0) + h * x.stride(1);
          for (int64_t i = 0; i < half; ++i) {
            const float first = static_cast<float>(row[i]), second = static_cast<float>(row[i + half]);
            row[i] = static_cast<scalar_t>(first * ct[i] - second * st[i]);
            row[i + half] = static_cast<scalar_t>(second * ct[i + half] + first * st[i + half]);
          }
        }
      }
    });
  });
}

// weight * x / sqrt(mean(x^2) + eps) over the last dimension, accumulated in float.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.size(-1) == weight.numel(), "weight must have one entry per feature");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "x and weight must share a dtype");
  const at::Tensor input = x.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty_like(input);
  const int64_t dim = input.size(-1), rows = input.numel() / dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    const scalar_t* scale = w.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = in + r * dim;
        float lanes[16] = {};  // partial sums in a fixed pattern, so the loop vectorizes
        int64_t i = 0;
        for (; i + 16 <= dim; i += 16)
          for (int64_t l = 0; l < 16; ++l) lanes[l] += static_cast<float>(row[i + l]) * static_cast<float>(row[i + l]);
        for (; i < dim; ++i) lanes[i % 16] += static_cast<float>(row[i]) * static_cast<float>(row[i]);
        float squares = 0.0f;
        for (int64_t l = 0; l < 16; ++l) squares += lanes[l];
        const float inverse = 1.0f / std::sqrt(squares / static_cast<float>(dim) + static_cast<float>(eps));
        for (i = 0; i < dim; ++i)
          dst[r * dim + i] = static_cast<scalar_t>(static_cast<float>(scale[i]) *
                                                   static_cast<float>(static_cast<scalar_t>(row[i] * inverse)));
      }
    });
  });
  return out;
}

// silu(gate) * up for gate_up [tokens, 2f] = [gate | up] (a fused gate/up projection's output): one pass
// instead of a sigmoid pass, a product pass and their temporaries.
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0, "gate_up must be [tokens, 2 * features]");
  const at::Tensor input = gate_up.contiguous();
  const int64_t rows = input.size(0), features = input.size(1) / 2;
  at::Tensor out = at::empty({rows, features}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* in = input.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* gate = in + r * 2 * features;
        const scalar_t* up = gate + features;
        for (int64_t i = 0; i < features; ++i) {
          const float g = static_cast<float>(gate[i]);
          const float activated = static_cast<float>(static_cast<scalar_t>(g / (1.0f + fast_exp(-g))));
          dst[r * features + i] = static_cast<scalar_t>(activated * static_cast<float>(up[i]));
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace rung

TORCH_LIBRARY_FRAGMENT(rung, m) {
  m.def("rotary_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(rung, CPU, m) {
  m.impl("rotary_", &rung::rotary_);
  m.impl("rms_norm", &rung::rms_norm);
  m.impl("silu_and_mul", &rung::silu_and_mul);
}
