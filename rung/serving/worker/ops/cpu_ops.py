"""The CPU compute path over rung's C++ kernels (`cpu_kernels.py`, `csrc/`): every single-token span of a step
attends in one kernel call and every span of several tokens (prefill chunks) in another; KV writes, RMSNorm, RoPE
and SwiGLU run in one pass each.

Linear layers run on oneDNN's GEMM over weights reordered once, at load, into its blocked layout (as vLLM's CPU
backend does). Why: torch's `F.linear` on a CPU goes to MKL with the weight as stored, which on this project's AMD
EPYC box ran at 0.5–0.9x of oneDNN's packed GEMM — decode-sized batches and the vocabulary projection lost most
(`bench/RESULTS.md`). A weight oneDNN cannot take (a dtype this CPU lacks instructions for, a build without oneDNN)
stays as it is and runs through `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rung.serving.worker.ops import cpu_kernels
from rung.serving.worker.ops.torch_ops import TorchOps
from rung.serving.worker.step import StepInputs


class CpuKernelOps(TorchOps):
    """The kernels where rung has one; PyTorch's operators (inherited) for the rest."""

    name = "cpu-kernels"

    def prepare(self, step: StepInputs) -> None:
        step.decodes, step.prefills  # noqa: B018 - built now, while (under async scheduling) the step before computes

    def pack_linear(self, weight: torch.Tensor) -> torch.Tensor:
        if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):  # private ops: checked, not assumed
            return weight
        try:
            return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        except RuntimeError:  # e.g. fp16 on a CPU without avx512_fp16
            return weight

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
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
