"""The Triton compute path: paged attention for the whole step — every decode and every prefill chunk, over contexts
that are runs of pool slots — in one kernel launch per layer, instead of PyTorch operators per span; and one launch
each for RMSNorm (fp32 statistics, cast, scale), rotary embedding of queries and keys together (in place), and the
step's KV-cache writes, where PyTorch spends several operators on each; and linear layers over int8 and int4
weights, dequantized tile by tile in registers. The float GEMMs, SwiGLU and the experts' grouped GEMM are PyTorch's
(TorchOps). Every kernel reads only tensors (no per-step Python values), so a decode step's
launches can be captured in a CUDA graph and replayed (`worker/cuda_graphs.py`).

One program per (query token, query head) walks its span's runs of the pool block by block with an online softmax
in fp32, reading only the keys its position may see (the causal limit), any head dim up to 256 (padded to a power of
two) and any GQA ratio (a query head reads its KV head's keys). On a GPU Triton compiles it; on a CPU it runs under
Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors — slowly, which is how the tests check it against the
PyTorch reference here.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from rung.errors import ConfigError
from rung.serving.worker.ops.torch_ops import TorchOps
from rung.serving.worker.quantization import QuantizedWeight
from rung.serving.worker.step import StepInputs

BLOCK_N = 32  # keys per iteration
MAX_HEAD_DIM = 256
GEMM_BLOCK_M, GEMM_BLOCK_N = 16, 64  # rows of x and of the weight per program of the quantized GEMM


def triton_available(device: torch.device) -> None:
    """Refuse, naming the setting, where the Triton path cannot run: no Triton, or a CPU outside the interpreter."""
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("attention_backend", "triton needs the triton package (pip install triton)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attention_backend", "triton runs on a CPU only under its interpreter: set "
                          "TRITON_INTERPRET=1 (for tests; use the C++ kernels, attention backend cpu, to serve)")


@functools.cache
def _kernels() -> SimpleNamespace:
    """The kernels, defined on first use so that importing rung does not import Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm(x_ptr, weight_ptr, out_ptr, stride_x, stride_out, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        i = tl.arange(0, BLOCK)
        inside = i < WIDTH
        x = tl.load(x_ptr + row * stride_x + i, mask=inside, other=0.0).to(tl.float32)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / WIDTH + eps)).to(out_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + i, mask=inside, other=0.0)
        tl.store(out_ptr + row * stride_out + i, (weight.to(tl.float32) * normed.to(tl.float32))
                 .to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def rotary(x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, HEADS: tl.constexpr, HALF: tl.constexpr,
               BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        token = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_HALF)[None, :]
        inside = (h < HEADS) & (d < HALF)
        low = x_ptr + token * stride_xt + h * stride_xh + d
        x1 = tl.load(low, mask=inside, other=0.0).to(tl.float32)
        x2 = tl.load(low + HALF, mask=inside, other=0.0).to(tl.float32)
        cos1 = tl.load(cos_ptr + token * stride_ct + d, mask=d < HALF, other=0.0)
        cos2 = tl.load(cos_ptr + token * stride_ct + HALF + d, mask=d < HALF, other=0.0)
        sin1 = tl.load(sin_ptr + token * stride_ct + d, mask=d < HALF, other=0.0)
        sin2 = tl.load(sin_ptr + token * stride_ct + HALF + d, mask=d < HALF, other=0.0)
        tl.store(low, (x1 * cos1 - x2 * sin1).to(x_ptr.dtype.element_ty), mask=inside)
        tl.store(low + HALF, (x2 * cos2 + x1 * sin2).to(x_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def write_kv(k_ptr, v_ptr, keys_ptr, values_ptr, slots_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_keys_h, stride_keys_d, stride_keys_s, stride_values_h, stride_values_s, stride_values_d,
                 HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        token = tl.program_id(0)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        inside = (h < HEADS) & (d < HEAD_DIM)
        slot = tl.load(slots_ptr + token)
        k = tl.load(k_ptr + token * stride_kt + h * stride_kh + d, mask=inside)
        v = tl.load(v_ptr + token * stride_vt + h * stride_vh + d, mask=inside)
        tl.store(keys_ptr + h * stride_keys_h + d * stride_keys_d + slot * stride_keys_s, k, mask=inside)
        tl.store(values_ptr + h * stride_values_h + slot * stride_values_s + d * stride_values_d, v, mask=inside)

    @triton.jit
    def paged_attention(q_ptr, k_ptr, v_ptr, out_ptr, run_start_ptr, run_length_ptr, first_run_ptr, last_run_ptr,
                        visible_ptr, stride_qt, stride_qh, stride_kh, stride_kd, stride_ks, stride_vh, stride_vs,
                        stride_vd, stride_ot, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK: tl.constexpr):
        token, head = tl.program_id(0), tl.program_id(1)
        kv_head = head // GROUP
        d = tl.arange(0, BLOCK_D)
        in_head = d < HEAD_DIM
        q = tl.load(q_ptr + token * stride_qt + head * stride_qh + d, mask=in_head, other=0.0).to(tl.float32)
        first_run, last_run = tl.load(first_run_ptr + token), tl.load(last_run_ptr + token)
        visible = tl.load(visible_ptr + token)  # context tokens this query may see
        best = tl.full([], float("-inf"), tl.float32)
        total = tl.full([], 0.0, tl.float32)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        position = 0
        for run in range(first_run, last_run):
            start, length = tl.load(run_start_ptr + run), tl.load(run_length_ptr + run)
            seen = tl.minimum(length, visible - position)
            for offset in range(0, seen, BLOCK):
                n = offset + tl.arange(0, BLOCK)
                valid = n < seen
                slot = start + n
                keys = tl.load(k_ptr + kv_head * stride_kh + d[:, None] * stride_kd + slot[None, :] * stride_ks,
                               mask=in_head[:, None] & valid[None, :], other=0.0).to(tl.float32)
                scores = tl.where(valid, tl.sum(q[:, None] * keys, axis=0), float("-inf"))
                new_best = tl.maximum(best, tl.max(scores, axis=0))
                weights = tl.exp(scores - new_best)
                rescale = tl.exp(best - new_best)
                values = tl.load(v_ptr + kv_head * stride_vh + slot[:, None] * stride_vs + d[None, :] * stride_vd,
                                 mask=valid[:, None] & in_head[None, :], other=0.0).to(tl.float32)
                acc = acc * rescale + tl.sum(weights[:, None] * values, axis=0)
                total = total * rescale + tl.sum(weights, axis=0)
                best = new_best
            position += length
        out = acc / total
        tl.store(out_ptr + token * stride_ot + head * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty), mask=in_head)

    @triton.jit
    def quantized_linear(x_ptr, q_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_om,
                         GROUP: tl.constexpr, INT4: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, K, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :], mask=(rows < M)[:, None], other=0.0)
            if INT4:  # byte j: feature 2j in its low nibble, 2j + 1 in its high one
                pairs = start // 2 + tl.arange(0, BLOCK_K // 2)
                packed = tl.load(q_ptr + cols[:, None] * stride_qn + pairs[None, :], mask=(cols < N)[:, None],
                                 other=0).to(tl.int32) & 0xFF
                low, high = packed & 0xF, packed >> 4
                levels = tl.interleave((low ^ 8) - 8, (high ^ 8) - 8)
            else:
                levels = tl.load(q_ptr + cols[:, None] * stride_qn + k[None, :], mask=(cols < N)[:, None], other=0)
            scale = tl.load(scale_ptr + cols * stride_sn + start // GROUP, mask=cols < N, other=0.0)
            weight = levels.to(tl.float32) * scale[:, None]
            acc += tl.dot(x.to(tl.float32), tl.trans(weight), input_precision=PRECISION)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=(rows < M)[:, None] & (cols < N)[None, :])

    return SimpleNamespace(paged_attention=paged_attention, rms_norm=rms_norm, rotary=rotary, write_kv=write_kv,
                           quantized_linear=quantized_linear, next_power_of_2=triton.next_power_of_2)


@dataclass(frozen=True)
class TritonQuantized:
    """A quantized weight as the Triton kernel reads it: int8 levels [out, in], or int4 ones two to a byte
    [out, in / 2], and fp32 scales [out, in / group]."""

    levels: torch.Tensor
    scales: torch.Tensor
    bits: int
    group_size: int
    block_k: int  # input features per step of the kernel: divides the group, so each step reads one scale a row


def pack_for_triton(weight: QuantizedWeight) -> TritonQuantized | None:
    """The kernel's layout, or None where its blocks do not fit (a group of fewer than 16 features, or not a multiple
    of 16): the reference path computes those."""
    block_k = next((b for b in (64, 32, 16) if weight.group_size % b == 0), None)
    if block_k is None:
        return None
    levels = weight.q
    if weight.bits == 4:
        levels = (levels[:, 0::2] & 0xF) | (levels[:, 1::2] << 4)
    return TritonQuantized(levels.contiguous(), weight.scales.contiguous(), weight.bits, weight.group_size, block_k)


class TritonOps(TorchOps):
    """PyTorch operators with attention in one Triton launch per layer."""

    name = "triton"

    def check_model(self, head_dim: int) -> None:
        if head_dim > MAX_HEAD_DIM or head_dim % 2:
            raise ConfigError("attention_backend", f"triton's kernels take even head dims up to {MAX_HEAD_DIM}; "
                              f"this model's is {head_dim} (use --attention-backend torch)")

    def prepare(self, step: StepInputs) -> None:
        step.run_layout()  # now, while (under async scheduling) the step before computes; nano-batches build theirs

    def pack_linear(self, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight | TritonQuantized:
        return (pack_for_triton(weight) or weight) if isinstance(weight, QuantizedWeight) else weight

    def linear(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight | TritonQuantized,
               bias: torch.Tensor | None) -> torch.Tensor:
        """A quantized weight in one launch: each step of the input features dequantizes a tile of levels in
        registers and multiplies it, accumulating in fp32 (weight-only: x as it is). fp32 activations multiply in
        full fp32, as the reference; half-precision ones in TF32, which holds them exactly (and holds the tile
        more finely than their own dtype would) — and Triton's interpreter, which the tests run, multiplies
        bf16 tiles wrongly."""
        if not isinstance(weight, TritonQuantized):
            return super().linear(x, weight, bias)
        kernels = _kernels()
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        count, features, outputs = rows.shape[0], rows.shape[1], weight.scales.shape[0]
        out = torch.empty(count, outputs, dtype=x.dtype, device=x.device)
        grid = (-(-count // GEMM_BLOCK_M), -(-outputs // GEMM_BLOCK_N))
        kernels.quantized_linear[grid](rows, weight.levels, weight.scales, out, count, outputs, features,
                                       rows.stride(0), weight.levels.stride(0), weight.scales.stride(0), out.stride(0),
                                       GROUP=weight.group_size, INT4=weight.bits == 4,
                                       PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                       BLOCK_M=GEMM_BLOCK_M, BLOCK_N=GEMM_BLOCK_N, BLOCK_K=weight.block_k)
        out = out.view(*x.shape[:-1], outputs)
        return out if bias is None else out + bias

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        kernels = _kernels()
        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(rows)
        kernels.rms_norm[(rows.shape[0],)](rows, weight, out, rows.stride(0), out.stride(0), eps, WIDTH=x.shape[-1],
                                          BLOCK=kernels.next_power_of_2(x.shape[-1]))
        return out.view(x.shape)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """In place: queries and keys are a view of the fused QKV projection's output, rotated in one launch."""
        kernels = _kernels()
        tokens, heads, head_dim = x.shape
        cos, sin = cos.reshape(tokens, head_dim), sin.reshape(tokens, head_dim)
        kernels.rotary[(tokens,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), HEADS=heads,
                                  HALF=head_dim // 2, BLOCK_H=kernels.next_power_of_2(heads),
                                  BLOCK_HALF=kernels.next_power_of_2(head_dim // 2))
        return x

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 slots: torch.Tensor) -> None:
        kernels = _kernels()
        tokens, heads, head_dim = k.shape
        kernels.write_kv[(tokens,)](k, v, keys, values, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                                    keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
                                    values.stride(1), values.stride(2), HEADS=heads, HEAD_DIM=head_dim,
                                    BLOCK_H=kernels.next_power_of_2(heads),
                                    BLOCK_D=kernels.next_power_of_2(head_dim))

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        kernels = _kernels()
        tokens, heads, head_dim = q.shape
        layout = step.run_layout()
        out = torch.empty(tokens, heads * head_dim, dtype=q.dtype, device=q.device)
        kernels.paged_attention[(tokens, heads)](q, keys, values, out, layout.run_starts, layout.run_lengths, layout.first_run,
                                                 layout.last_run, layout.visible, q.stride(0), q.stride(1),
                                                 keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
                                                 values.stride(1), values.stride(2), out.stride(0),
                                                 GROUP=heads // keys.shape[0], HEAD_DIM=head_dim,
                                                 BLOCK_D=kernels.next_power_of_2(head_dim), BLOCK=BLOCK_N)
        return out
