"""The PyTorch compute path: every operation the model needs, in PyTorch operators, on any device.

It is the reference: rung's other paths (the C++ CPU kernels) are tested against these functions. Attention reads a
request's context as views of the pool (no gather when its blocks are consecutive), stacks the query heads that share
a KV head into one matrix product per KV head, and tiles long prefills so a tile only reads the keys it can see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rung.serving.worker.quantization import QuantizedWeight
from rung.serving.worker.step import StepInputs

ATTENTION_TILE = 128  # query rows per score matrix: a causal tile reads only the keys its last row can see
RUNS_READ_IN_PLACE = 4  # a decode over more runs than this copies them into one: fewer, larger products


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, 1, head_dim] computed in fp32 (as transformers does), once per step for every layer."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin.to(x.dtype)


def attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], in_place: bool) -> torch.Tensor:
    """Causal attention of one request's `rows` newest tokens over its whole context: q [rows, heads, head_dim],
    scaled; the context as runs of views of the pool, keys [kv_heads, head_dim, run] and values [kv_heads, run,
    head_dim]. The query heads that share a KV head are stacked as rows of one matrix product per KV head, so no
    KV is copied per query head; a decode reads each run in place, and tiles of ATTENTION_TILE prefill rows skip
    the keys they cannot see. Returns [rows, heads * head_dim]."""
    rows, heads, head_dim = q.shape
    kv_heads, group = keys[0].shape[0], heads // keys[0].shape[0]
    if rows == 1 and len(keys) == 1:  # a decode over one run, the common case: three operations
        probs = torch.softmax(torch.bmm(q.view(kv_heads, group, head_dim), keys[0]), -1, dtype=torch.float32)
        return torch.bmm(probs.to(values[0].dtype), values[0]).view(1, heads * head_dim)
    if rows == 1 and in_place and len(keys) <= RUNS_READ_IN_PLACE:  # a decode over a few runs, each read in place
        q = q.view(kv_heads, group, head_dim)
        probs = torch.softmax(torch.cat([torch.bmm(q, run) for run in keys], dim=-1), -1, dtype=torch.float32)
        parts = probs.to(values[0].dtype).split([run.shape[1] for run in values], dim=-1)
        out = torch.bmm(parts[0], values[0])
        for part, run in zip(parts[1:], values[1:]):
            out += torch.bmm(part, run)
        return out.view(1, heads * head_dim)
    keys = keys[0] if len(keys) == 1 else torch.cat(keys, dim=-1)
    values = values[0] if len(values) == 1 else torch.cat(values, dim=1)
    context = keys.shape[-1]
    tiles = []
    for start in range(0, rows, ATTENTION_TILE):
        n = min(ATTENTION_TILE, rows - start)
        first, end = context - rows + start, context - rows + start + n  # positions of the tile's rows
        tile = q[start:start + n].view(n, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.bmm(tile.reshape(kv_heads, group * n, head_dim), keys[:, :, :end])
        if n > 1:  # the tile's rows see every earlier key: only its own n x n corner needs the causal mask
            scores.view(kv_heads, group, n, end)[..., first:].masked_fill_(
                torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        tiles.append(torch.bmm(probs, values[:, :end]).view(kv_heads, group, n, head_dim).permute(2, 0, 1, 3)
                     .reshape(n, heads * head_dim))
    return tiles[0] if len(tiles) == 1 else torch.cat(tiles)


def attend_span(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, rows: int,
                runs: list[slice], in_place: bool) -> torch.Tensor:
    """`attend` for the span whose rows start at `first`, its context given as runs of pool slots."""
    return attend(q[first:first + rows], [keys[:, :, run] for run in runs], [values[:, run] for run in runs],
                  in_place)


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ends[e-1]..ends[e]-1 of x times weights[e] ([in, out]) for every expert e. On a CPU, torch's grouped
    GEMM (one call for all experts, any float dtype, rows of a multiple of 16 bytes); elsewhere one product per
    expert over its slice, since the CUDA grouped GEMM takes bf16 on recent GPUs only."""
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, weights))
    if x.device.type == "cpu" and aligned and hasattr(torch, "_grouped_mm"):  # a private op: checked, not assumed
        return torch._grouped_mm(x, weights, offs=ends)
    bounds = [0, *ends.tolist()]
    return torch.cat([x[start:stop] @ weights[e] for e, (start, stop) in enumerate(zip(bounds, bounds[1:]))])


class TorchOps:
    """PyTorch operators on any device: one attention call per span."""

    name = "pytorch"

    def check_model(self, head_dim: int) -> None:
        """Any head dim: PyTorch's operators take every shape."""

    def prepare(self, step: StepInputs) -> None:
        """Nothing to precompute: spans carry their runs."""

    def pack_linear(self, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
        return weight

    def linear(self, x: torch.Tensor, weight: torch.Tensor | QuantizedWeight,
               bias: torch.Tensor | None) -> torch.Tensor:
        """A quantized weight is dequantized to x's dtype for each product: the reference, exact to the levels,
        and no faster than the float weight."""
        if isinstance(weight, QuantizedWeight):
            weight = weight.dequantize(x.dtype)
        return F.linear(x, weight, bias)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return rope(x, cos, sin)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 slots: torch.Tensor) -> None:
        keys[:, :, slots] = k.permute(1, 2, 0)
        values[:, slots] = v.transpose(0, 1)

    def attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  step: StepInputs) -> torch.Tensor:
        return torch.cat([attend_span(q, keys, values, first, rows, runs, step.read_in_place)
                          for first, rows, runs in step.spans])

    def grouped_matmul(self, x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        return grouped_matmul(x, weights, ends)
