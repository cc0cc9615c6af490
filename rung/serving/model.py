"""rung's inference model for Llama-family, Mixtral and Granite folders, reading and writing a paged KV cache.

Hugging Face's modeling code keeps a contiguous cache per sequence; here every layer writes the step's keys and
values into cache slots first, then each request attends over the slots its block table names — so all requests
of a step, at any mix of prefill chunks and decodes, run as one packed batch of tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rung.errors import RungError
from rung.serving import kernels
from rung.serving.model_spec import ModelSpec


@dataclass
class DecodeBatch:
    """The step's single-token spans as the decode kernel reads them: their rows in the batch and their contexts
    as runs of pool slots (request r's runs are offsets[r]..offsets[r+1]-1)."""

    rows: torch.Tensor | slice  # a slice when they lead the batch, as the scheduler puts decodes first
    starts: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor


@dataclass
class StepInputs:
    """What one forward pass needs, built by the runner from a step plan."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot of each token
    # per request: (first row in the batch, rows, its whole context as runs of consecutive slots in the pool)
    spans: list[tuple[int, int, list[slice]]]
    # a decode reads a context of a few runs in place, one product per run; off, every context of several runs is
    # copied into one first, so a request's arithmetic never depends on where its blocks sit (deterministic mode)
    read_in_place: bool = True

    @cached_property
    def decodes(self) -> DecodeBatch | None:
        """Built once per step (not per layer) for the decode kernel; None when no span is a single token."""
        rows, starts, lengths, offsets = [], [], [], [0]
        for first, count, runs in self.spans:
            if count == 1:
                rows.append(first)
                starts.extend(run.start for run in runs)
                lengths.extend(run.stop - run.start for run in runs)
                offsets.append(len(starts))
        if not rows:
            return None
        return DecodeBatch(slice(0, len(rows)) if rows[-1] == len(rows) - 1 else torch.tensor(rows),
                           torch.tensor(starts), torch.tensor(lengths), torch.tensor(offsets))

    def to(self, device: torch.device) -> StepInputs:
        """The same step with its index tensors on `device` (runs are plain slices)."""
        return replace(self, token_ids=self.token_ids.to(device, non_blocking=True),
                       positions=self.positions.to(device, non_blocking=True),
                       slots=self.slots.to(device, non_blocking=True))

    def split(self, parts: int) -> list[tuple[slice, StepInputs]]:
        """Up to `parts` nano-batches of whole spans with about equal token counts, in span order (a span may read
        blocks an earlier span of the same step writes, so order is kept)."""
        total = len(self.token_ids)
        boundaries = [first + rows for first, rows, _ in self.spans[:-1]]  # where a cut may go
        cuts: list[int] = []
        for k in range(1, parts):
            later = [b for b in boundaries if not cuts or b > cuts[-1]]
            if later:
                cuts.append(min(later, key=lambda b: abs(b - total * k / parts)))
        bounds = [0, *sorted(set(cuts)), total]
        out = []
        for start, stop in zip(bounds, bounds[1:]):
            spans = [(first - start, rows, ctx) for first, rows, ctx in self.spans if start <= first < stop]
            out.append((slice(start, stop), StepInputs(self.token_ids[start:stop], self.positions[start:stop],
                                                       self.slots[start:stop], spans, self.read_in_place)))
        return out


def load_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    weights = {}
    for name in files:
        if not (folder / name).is_file():
            raise RungError(f"{folder} is missing its weights file {name}")
        weights.update(load_file(str(folder / name)))
    return weights


def _rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, 1, head_dim] computed in fp32 (as transformers does), once per step for every layer."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin.to(x.dtype)


ATTENTION_TILE = 128  # query rows per score matrix: a causal tile reads only the keys its last row can see
RUNS_READ_IN_PLACE = 4  # a decode over more runs than this copies them into one: fewer, larger products


def _attend(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], in_place: bool) -> torch.Tensor:
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


def _grouped_matmul(x: torch.Tensor, weights: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """Rows ends[e-1]..ends[e]-1 of x times weights[e] ([in, out]) for every expert e. On a CPU, torch's grouped
    GEMM (one call for all experts, any float dtype, rows of a multiple of 16 bytes); elsewhere one product per
    expert over its slice, since the CUDA grouped GEMM takes bf16 on recent GPUs only."""
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, weights))
    if x.device.type == "cpu" and aligned and hasattr(torch, "_grouped_mm"):  # a private op: checked, not assumed
        return torch._grouped_mm(x, weights, offs=ends)
    bounds = [0, *ends.tolist()]
    return torch.cat([x[start:stop] @ weights[e] for e, (start, stop) in enumerate(zip(bounds, bounds[1:]))])


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def _expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shapes config.json implies for the tensors every supported architecture has."""
    d, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    shapes = {"model.embed_tokens.weight": (spec.vocab_size, d), "model.norm.weight": (d,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, d)
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        shapes.update({prefix + "self_attn.q_proj.weight": (q, d), prefix + "self_attn.k_proj.weight": (kv, d),
                       prefix + "self_attn.v_proj.weight": (kv, d), prefix + "self_attn.o_proj.weight": (d, q),
                       prefix + "input_layernorm.weight": (d,), prefix + "post_attention_layernorm.weight": (d,)})
    return shapes


class InferenceModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu")):
        self.spec, self.device = spec, device
        # on a CPU, decode attention, KV writes, RMSNorm, RoPE and SwiGLU go through rung's compiled kernels when
        # they are built; elsewhere (and without them) through PyTorch's operators
        self.use_kernels = device.type == "cpu" and kernels.loaded()
        self.last_nano_batches = 0
        self.w = {name: tensor.to(device=device, dtype=dtype) for name, tensor in weights.items()}
        expected = _expected_shapes(spec)
        missing = [name for name in expected if name not in self.w]
        if missing:
            raise RungError(f"the weights do not match the config: missing {', '.join(missing[:5])}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        wrong = [f"{name} is {tuple(self.w[name].shape)}, the config implies {shape}"
                 for name, shape in expected.items() if tuple(self.w[name].shape) != shape]
        if wrong:
            raise RungError(f"the weights do not match the config: {'; '.join(wrong[:3])}")
        self.lm_head = self.w["model.embed_tokens.weight"] if spec.tie_word_embeddings else self.w["lm_head.weight"]
        self.experts = [self._experts(i) for i in range(spec.num_layers)] if spec.num_experts else None
        self._fuse_projections()

    def _fuse_projections(self) -> None:
        """One GEMM for q, k and v (queries scaled by the attention scale on the way) and one for gate and up, as
        vLLM does: fewer, larger products per layer, and no pass to scale the queries."""
        for layer in range(self.spec.num_layers):
            prefix = f"model.layers.{layer}."
            groups = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}
            if not self.spec.num_experts:
                groups["mlp.gate_up_proj"] = ["mlp.gate_proj", "mlp.up_proj"]
            for fused, parts in groups.items():
                for kind in ("weight", "bias"):
                    if f"{prefix}{parts[0]}.{kind}" in self.w:
                        self.w[f"{prefix}{fused}.{kind}"] = torch.cat([self.w.pop(f"{prefix}{part}.{kind}")
                                                                       for part in parts])
            for kind in ("weight", "bias"):  # queries come out scaled for attention (RoPE is linear)
                name = f"{prefix}self_attn.qkv_proj.{kind}"
                if name in self.w:
                    self.w[name][:self.spec.num_heads * self.spec.head_dim] *= self.spec.attention_scale

    def _experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router [E, d], gate and up [E, d, 2f], down [E, f, d]) from either folder layout, stored as the
        grouped GEMM reads them (input features first)."""
        prefix = f"model.layers.{layer}.block_sparse_moe."
        if self.spec.family == "granite":
            gate_up, down = self.w.pop(prefix + "input_linear.weight"), self.w.pop(prefix + "output_linear.weight")
            router = self.w[prefix + "router.layer.weight"]
        else:
            experts = range(self.spec.num_experts)
            stack = lambda name: torch.stack([self.w.pop(f"{prefix}experts.{e}.{name}.weight")  # noqa: E731
                                              for e in experts])
            gate_up, down, router = torch.cat([stack("w1"), stack("w3")], dim=1), stack("w2"), \
                self.w[prefix + "gate.weight"]
        return router, gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()

    def _norm(self, x: torch.Tensor, weight: str) -> torch.Tensor:
        return (kernels.rms_norm if self.use_kernels else _rms_norm)(x, self.w[weight], self.spec.rms_norm_eps)

    def _swiglu(self, gate_up: torch.Tensor) -> torch.Tensor:
        """silu(gate) * up of a fused gate/up projection's output [tokens, 2f]."""
        if self.use_kernels:
            return kernels.silu_and_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _moe(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Top-k routing with renormalised gates; the (token, expert) pairs sorted by expert go through one
        grouped GEMM per projection, each expert's rows against its own weights."""
        router, gate_up, down = self.experts[layer]
        probs = torch.softmax(F.linear(x, router).float(), dim=-1)
        weights, chosen = probs.topk(self.spec.num_experts_per_tok, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        order = chosen.flatten().argsort(stable=True)
        tokens = order // self.spec.num_experts_per_tok
        ends = torch.bincount(chosen.flatten(), minlength=self.spec.num_experts).cumsum(0).to(torch.int32)
        y = _grouped_matmul(self._swiglu(_grouped_matmul(x[tokens], gate_up, ends)), down, ends)
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def _mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        prefix = f"model.layers.{layer}."
        if not self.spec.num_experts:
            hidden = self._swiglu(self._linear(x, prefix + "mlp.gate_up_proj"))
            return self._linear(hidden, prefix + "mlp.down_proj")
        out = self._moe(x, layer)
        if self.spec.shared_intermediate_size:
            shared = self._swiglu(self._linear(x, prefix + "shared_mlp.input_linear"))
            out = out + self._linear(shared, prefix + "shared_mlp.output_linear")
        return out

    def _attention(self, x: torch.Tensor, layer: int, step: StepInputs, cache: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        spec, prefix = self.spec, f"model.layers.{layer}.self_attn."
        qkv = self._linear(x, prefix + "qkv_proj").view(-1, spec.num_heads + 2 * spec.num_kv_heads, spec.head_dim)
        qk = qkv[:, :spec.num_heads + spec.num_kv_heads]  # one rotation for queries and keys
        qk = kernels.rotary_(qk, *rope) if self.use_kernels else _rope(qk, *rope)
        q, k, v = qk[:, :spec.num_heads], qk[:, spec.num_heads:], qkv[:, spec.num_heads + spec.num_kv_heads:]
        keys = cache[layer, 0].view(spec.num_kv_heads, spec.head_dim, -1)  # [kv heads, head dim, slots]
        values = cache[layer, 1].view(spec.num_kv_heads, -1, spec.head_dim)  # [kv heads, slots, head dim]
        if self.use_kernels:  # the whole step's KV first: a span may read another's new blocks
            kernels.write_kv(k, v, keys, values, step.slots)
        else:
            keys[:, :, step.slots] = k.permute(1, 2, 0)
            values[:, step.slots] = v.transpose(0, 1)

        def attend(first: int, rows: int, runs: list[slice]) -> torch.Tensor:
            return _attend(q[first:first + rows], [keys[:, :, run] for run in runs], [values[:, run] for run in runs],
                           step.read_in_place)

        decodes = step.decodes if self.use_kernels else None
        if decodes is None:
            out = torch.cat([attend(*span) for span in step.spans])
        else:  # every single-token span in one kernel call, the longer spans one by one
            out = q.new_empty(len(q), spec.num_heads * spec.head_dim)
            out[decodes.rows] = kernels.decode_attention(q[decodes.rows], keys, values, decodes.starts,
                                                         decodes.lengths, decodes.offsets).flatten(1)
            for first, rows, runs in step.spans:
                if rows > 1:
                    out[first:first + rows] = attend(first, rows, runs)
        return self._linear(out, prefix + "o_proj")

    @torch.inference_mode()
    def forward(self, step: StepInputs, cache: torch.Tensor, nano_batches: int = 1) -> torch.Tensor:
        """Final hidden states [T, d] for the packed step, computed as up to `nano_batches` nano-batches of whole
        spans per layer. On CUDA one nano-batch's attention runs on one stream while the previous one's MLP GEMMs
        run on another (NanoFlow's intra-layer overlap); elsewhere they run one after the other — the same math."""
        spec = self.spec
        x = F.embedding(step.token_ids, self.w["model.embed_tokens.weight"])
        if spec.embedding_multiplier != 1.0:
            x = x * spec.embedding_multiplier
        cos, sin = _rope_tables(step.positions, spec.head_dim, spec.rope_theta)
        parts = step.split(nano_batches) if nano_batches > 1 else [(slice(0, len(step.token_ids)), step)]
        self.last_nano_batches = len(parts)  # what the step was split into, for the serving metrics
        if x.is_cuda and len(parts) > 1:
            self._overlapped_layers(x, parts, cache, cos, sin)
        else:
            for layer in range(spec.num_layers):
                for rows, sub in parts:
                    x[rows] = self._attention_block(x[rows], layer, sub, cache, (cos[rows], sin[rows]))
                    x[rows] = self._mlp_block(x[rows], layer)
        return self._norm(x, "model.norm.weight")

    def _attention_block(self, x: torch.Tensor, layer: int, step: StepInputs, cache: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self._norm(x, f"model.layers.{layer}.input_layernorm.weight")
        return torch.add(x, self._attention(h, layer, step, cache, rope), alpha=self.spec.residual_multiplier)

    def _mlp_block(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        h = self._norm(x, f"model.layers.{layer}.post_attention_layernorm.weight")
        return torch.add(x, self._mlp(h, layer), alpha=self.spec.residual_multiplier)

    def _overlapped_layers(self, x: torch.Tensor, parts: list[tuple[slice, StepInputs]], cache: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Attention on one CUDA stream, MLPs on another, ordered by per-part events: part i's attention at
        layer l waits only for its own MLP at layer l-1, so it overlaps part i-1's MLP at layer l."""
        if not hasattr(self, "_cuda_streams"):
            self._cuda_streams = (torch.cuda.Stream(x.device), torch.cuda.Stream(x.device))
        attention, mlp = self._cuda_streams
        for stream in (attention, mlp):
            stream.wait_stream(torch.cuda.current_stream(x.device))
        mlp_done: list[torch.cuda.Event | None] = [None] * len(parts)
        for layer in range(self.spec.num_layers):
            for index, (rows, sub) in enumerate(parts):
                if mlp_done[index] is not None:
                    attention.wait_event(mlp_done[index])
                with torch.cuda.stream(attention):
                    x[rows] = self._attention_block(x[rows], layer, sub, cache, (cos[rows], sin[rows]))
                    attended = torch.cuda.Event()
                    attended.record(attention)
                mlp.wait_event(attended)
                with torch.cuda.stream(mlp):
                    x[rows] = self._mlp_block(x[rows], layer)
                    mlp_done[index] = torch.cuda.Event()
                    mlp_done[index].record(mlp)
        torch.cuda.current_stream(x.device).wait_stream(mlp)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.lm_head).float()
        return logits if self.spec.logits_multiplier == 1.0 else logits * self.spec.logits_multiplier
