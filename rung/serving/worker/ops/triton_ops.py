"""The Triton compute path: paged attention for the whole step — every decode and every prefill chunk, over contexts
that are runs of pool slots — in one kernel launch per layer, instead of PyTorch operators per span. The other
operations are PyTorch's (TorchOps).

One program per (query token, query head) walks its span's runs of the pool block by block with an online softmax
in fp32, reading only the keys its position may see (the causal limit), any head dim up to 256 (padded to a power of
two) and any GQA ratio (a query head reads its KV head's keys). On a GPU Triton compiles it; on a CPU it runs under
Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors — slowly, which is how the tests check it against the
PyTorch reference here.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from rung.errors import ConfigError
from rung.serving.worker.ops.torch_ops import TorchOps
from rung.serving.worker.step import StepInputs

BLOCK_N = 32  # keys per iteration
MAX_HEAD_DIM = 256


def triton_available(device: torch.device) -> None:
    """Refuse, naming the setting, where the Triton path cannot run: no Triton, or a CPU outside the interpreter."""
    if importlib.util.find_spec("triton") is None:
        raise ConfigError("attention_backend", "triton needs the triton package (pip install triton)")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("attention_backend", "triton runs on a CPU only under its interpreter: set "
                          "TRITON_INTERPRET=1 (for tests; use the C++ kernels, attention backend cpu, to serve)")


def _kernel():
    """The kernel, defined on first use so that importing rung does not import Triton."""
    import triton
    import triton.language as tl

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

    return paged_attention


_KERNEL = None


class TritonOps(TorchOps):
    """PyTorch operators with attention in one Triton launch per layer."""

    name = "triton"

    def __init__(self) -> None:
        self._layouts: dict[int, tuple[torch.Tensor, ...]] = {}

    def prepare(self, step: StepInputs) -> None:
        """A new step: forget the last step's per-token layouts (each nano-batch's is built on its first layer)."""
        self._layouts.clear()

    def _layout(self, step: StepInputs, device: torch.device) -> tuple[torch.Tensor, ...]:
        """Per query token: the first and last+1 run of its span, and how many context tokens it sees; and every
        run's first slot and length. Built once per step (or nano-batch), read by every layer."""
        layout = self._layouts.get(id(step))
        if layout is None:
            starts, lengths, first, last, visible = [], [], [], [], []
            for _, rows, runs in step.spans:
                begin = len(starts)
                starts += [run.start for run in runs]
                lengths += [run.stop - run.start for run in runs]
                context = sum(run.stop - run.start for run in runs)
                first += [begin] * rows
                last += [len(starts)] * rows
                visible += range(context - rows + 1, context + 1)
            layout = tuple(torch.tensor(values, dtype=torch.int32, device=device)
                           for values in (starts, lengths, first, last, visible))
            self._layouts[id(step)] = layout
        return layout

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        global _KERNEL
        import triton

        tokens, heads, head_dim = q.shape
        if head_dim > MAX_HEAD_DIM:
            raise ConfigError("attention_backend", f"triton attention takes head dims up to {MAX_HEAD_DIM}, "
                              f"got {head_dim}")
        _KERNEL = _KERNEL or _kernel()
        starts, lengths, first, last, visible = self._layout(step, q.device)
        out = torch.empty(tokens, heads * head_dim, dtype=q.dtype, device=q.device)
        _KERNEL[(tokens, heads)](q, keys, values, out, starts, lengths, first, last, visible,
                                 q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
                                 values.stride(0), values.stride(1), values.stride(2), out.stride(0),
                                 GROUP=heads // keys.shape[0], HEAD_DIM=head_dim,
                                 BLOCK_D=triton.next_power_of_2(head_dim), BLOCK=BLOCK_N)
        return out
