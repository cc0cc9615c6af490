"""The CPU compute path over rung's C++ kernels (`cpu_kernels.py`, `csrc/`): every single-token span of a step
attends in one kernel call, KV writes, RMSNorm, RoPE and SwiGLU run in one pass each; spans of several tokens
(prefill chunks) attend through the PyTorch path's tiled attention."""

from __future__ import annotations

import torch

from rung.serving.worker.ops import cpu_kernels
from rung.serving.worker.ops.torch_ops import TorchOps, attend_span
from rung.serving.worker.step import StepInputs


class CpuKernelOps(TorchOps):
    """The kernels where rung has one; PyTorch's operators (inherited) for the rest."""

    name = "cpu-kernels"

    def prepare(self, step: StepInputs) -> None:
        step.decodes  # noqa: B018 - built now, while (under async scheduling) the step before computes

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
        decodes = step.decodes
        if decodes is None:
            return super().attention(q, keys, values, step)
        out = q.new_empty(len(q), q.shape[1] * q.shape[2])
        out[decodes.rows] = cpu_kernels.decode_attention(q[decodes.rows], keys, values, decodes.starts,
                                                         decodes.lengths, decodes.offsets).flatten(1)
        for first, rows, runs in step.spans:
            if rows > 1:
                out[first:first + rows] = attend_span(q, keys, values, first, rows, runs, step.read_in_place)
        return out
