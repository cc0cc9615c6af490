"""The CPU compute path over rung's C++ kernels (`cpu_kernels.py`, `csrc/`): every single-token span of a step
attends in one kernel call and every span of several tokens (prefill chunks) in another; KV writes, RMSNorm, RoPE
and SwiGLU run in one pass each.

Linear layers run on oneDNN's GEMM over weights reordered once, at load, into its blocked layout (as vLLM's CPU
backend does). Why: torch's `F.linear` on a CPU goes to MKL with the weight as stored, which on this project's AMD
EPYC box ran at 0.5–0.9x of oneDNN's packed GEMM — decode-sized batches and the vocabulary projection lost most
(`bench/RESULTS.md`). A weight oneDNN cannot take (a dtype this CPU lacks instructions for, a build without oneDNN)
stays as it is and runs through `F.linear`.

Quantized weights (`worker/quantization.py`) run on rung's integer kernel (`csrc/quantized_linear.cpp`): at decode
batch sizes a CPU's float GEMM is bound by arithmetic rather than by reading weights, so it multiplies int8 levels
by each row of x quantized to int8 (its own scale per row), 64 pairs per AVX-512 VNNI instruction (AVX2's byte
multiply-add where there is no VNNI). torch's own weight-only operators (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`) were measured on this project's AVX-512 AMD EPYC box first: with float activations
12-70x slower than the float GEMM, and with bf16 ones 0.65-0.93x of it at 32 rows (`bench/quantized_gemm.py`;
rung's kernel 3.2-4.2x; on an AVX2-only EPYC 1.3-1.5x).
The per-row quantization of x is the kernel's only extra rounding; `rung eval` measures what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rung.serving.worker.ops import cpu_kernels
from rung.serving.worker.ops.torch_ops import TorchOps
from rung.serving.worker.quantization import QuantizedWeight
from rung.serving.worker.step import StepInputs

LANES = 16  # output rows per block of the integer kernel


@dataclass(frozen=True)
class PackedQuantized:
    """A quantized weight in the integer kernel's layouts (`csrc/quantized_linear.cpp`)."""

    levels: torch.Tensor  # int8 [out/16, in/4, 64]; int4: [out/16, in/4, 32], two levels a byte
    scales: torch.Tensor  # fp32 [out/16, groups, 16]
    shifts: torch.Tensor  # int32 [out/16, groups, 16]: 128 x each group's sum of levels
    out_features: int


def pack_quantized(weight: QuantizedWeight) -> PackedQuantized:
    """The kernel's layouts of `weight`, output rows padded to a multiple of 16 with zero levels."""
    out, features = weight.shape
    padded = -out % LANES
    q = F.pad(weight.q, (0, 0, 0, padded))
    scales = F.pad(weight.scales, (0, 0, 0, padded), value=1.0)
    blocks, groups = (out + padded) // LANES, scales.shape[1]
    levels = q.view(blocks, LANES, features // 4, 4).transpose(1, 2).reshape(blocks, features // 4, 4 * LANES)
    if weight.bits == 4:  # byte j: level j in the low nibble, level j + 32 in the high one
        levels = (levels[..., :2 * LANES] & 0xF) | (levels[..., 2 * LANES:] << 4)
    shifts = 128 * q.view(out + padded, groups, -1).sum(-1, dtype=torch.int32)
    per_block = lambda t: t.view(blocks, LANES, groups).transpose(1, 2).contiguous()  # noqa: E731
    return PackedQuantized(levels, per_block(scales), per_block(shifts), out)


class CpuKernelOps(TorchOps):
    """The kernels where rung has one; PyTorch's operators (inherited) for the rest."""

    name = "cpu-kernels"

    def prepare(self, step: StepInputs) -> None:
        step.decodes, step.prefills  # noqa: B018 - built now, while (under async scheduling) the step before computes

    def pack_linear(self, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | PackedQuantized | QuantizedWeight:
        if isinstance(weight, QuantizedWeight):  # the kernel reads input features in fours
            return pack_quantized(weight) if weight.group_size % 4 == 0 else weight
        if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):  # private ops: checked, not assumed
            return weight
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        except RuntimeError:  # e.g. fp16 on a CPU without avx512_fp16
            return weight

    def linear(self, x: torch.Tensor, weight: torch.Tensor | PackedQuantized | QuantizedWeight,
               bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(weight, PackedQuantized):
            out = cpu_kernels.quantized_linear(x.float(), weight.levels, weight.scales, weight.shifts,
                                               weight.out_features).to(x.dtype)
            return out if bias is None else out + bias
        if isinstance(weight, QuantizedWeight):
            return super().linear(x, weight, bias)
        if weight.is_mkldnn:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return cpu_kernels.rms_norm(x, weight, eps)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.rotary_(x, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.silu_and_mul(gate_up)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 slots: torch.Tensor) -> None:
        cpu_kernels.write_kv(k, v, keys, values, slots)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        out = q.new_empty(q.shape)
        if (decodes := step.decodes) is not None:
            out[decodes.rows] = cpu_kernels.decode_attention(q[decodes.rows], keys, values, decodes.starts,
                                                             decodes.lengths, decodes.offsets)
        if (prefills := step.prefills) is not None:
            cpu_kernels.prefill_attention(q, keys, values, prefills.firsts, prefills.counts, prefills.starts,
                                          prefills.lengths, prefills.offsets, out)
        return out.view(len(q), -1)
