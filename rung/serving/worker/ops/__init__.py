"""The compute paths of rung's inference model: the operations whose fastest form depends on the device, behind
one interface, so the model (`worker/model.py`) is written once and a new device adds an implementation here.

    Ops (this interface)
     ├─ TorchOps       PyTorch operators: any device; the reference every other path is tested against
     ├─ CpuKernelOps   rung's C++ kernels (csrc/) for CPUs: decode attention of a whole step in one call,
     │                 fused KV writes, RMSNorm, RoPE and SwiGLU, the int8 GEMM over quantized weights; and
     │                 oneDNN's GEMMs over float weights packed at load
     └─ TritonOps      paged attention of the whole step in one Triton launch per layer and the weight-only GEMM
                       over quantized weights (GPUs; on a CPU under Triton's interpreter, for tests), PyTorch's
                       operators for the rest

`select.select_ops(device, backend)` picks (the engine's `attention_backend`, `auto` by default): the C++ kernels on a
CPU where they are built (and RUNG_KERNELS is not 0), Triton on a GPU where it is installed, PyTorch's operators
everywhere else.
"""

from __future__ import annotations

from typing import Protocol

import torch

from rung.serving.worker.quantization import QuantizedWeight
from rung.serving.worker.step import StepInputs


class Ops(Protocol):
    """What the model's layers ask of a compute path. Tensors are on the model's device; the KV pool is viewed per
    layer as keys [kv_heads, head_dim, slots] and values [kv_heads, slots, head_dim]."""

    name: str

    def check_model(self, head_dim: int) -> None:
        """Refuse (ConfigError) a model shape this path cannot compute, before any weight is loaded."""

    def prepare(self, step: StepInputs) -> None:
        """Build whatever metadata this path needs for `step` (a whole step or one of its nano-batches) once, not per
        layer, before it runs."""

    def pack_linear(self, weight: torch.Tensor | QuantizedWeight) -> object:
        """A linear layer's weight [out, in], float or quantized (`worker/quantization.py`), in the layout this
        path's `linear` reads fastest, made once at load."""

    def linear(self, x: torch.Tensor, weight: object, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ weight.T + bias, for a weight `pack_linear` made."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [tokens, heads, head_dim] rotated by fp32 tables [tokens, 1, head_dim] (possibly in place)."""

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused gate/up projection's output [tokens, 2f]."""

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 slots: torch.Tensor) -> None:
        """k, v [tokens, kv_heads, head_dim] into the pool, token t at slot slots[t]."""

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        """Causal attention of every span of the step over its context in the pool: q [tokens, heads, head_dim]
        (scaled), returns [tokens, heads * head_dim]."""

    def grouped_matmul(self, x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Rows ends[e-1]..ends[e]-1 of x times weights[e] ([in, out]) for every expert e."""
