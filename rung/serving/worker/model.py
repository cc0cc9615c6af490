"""rung's inference model for Llama-family, Mixtral and Granite folders, reading and writing a paged KV cache.

Hugging Face's modeling code keeps a contiguous cache per sequence; here every layer writes the step's keys and
values into cache slots first, then each request attends over the slots its block table names — so all requests
of a step, at any mix of prefill chunks and decodes, run as one packed batch of tokens.

The model is written once; whatever depends on the device (attention, norms, rotary, activation, KV writes, the
experts' grouped GEMM) goes through its compute path, `self.ops` (`worker/ops/`).

Under tensor parallelism (`worker/parallel/`) it is one rank's shard: its spec has the rank's heads and FFN width,
each attention and MLP block's output is a partial sum that the ranks all-reduce before the residual add, the
embedding is looked up in the rank's vocabulary rows and summed, and the logits are gathered on rank 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rung.serving.worker.model_spec import ModelSpec
from rung.serving.worker.ops import Ops
from rung.serving.worker.ops.select import select_ops
from rung.serving.worker.ops.torch_ops import rope_tables
from rung.serving.worker.overlap import StreamOverlap
from rung.serving.worker.parallel.group import Handle, TensorParallelGroup
from rung.serving.worker.quantization import QUANTIZABLE, QuantizedWeight, WeightQuantization
from rung.serving.worker.step import StepInputs
from rung.serving.worker.weights import check_weights, fuse_projections, stack_experts


class InferenceModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor | QuantizedWeight],
                 dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu"), ops: Ops | None = None,
                 quantization: WeightQuantization | None = None, group: TensorParallelGroup | None = None,
                 overlap_collectives: bool = True):
        """`spec`: the shapes this process computes (a tensor-parallel rank's share, `Shard.local_spec`); `group`:
        the rank's process group, None on one device; `overlap_collectives`: a nano-batch's all-reduce runs while
        the next one computes (off: each waits for its own at once)."""
        self.spec, self.device, self.dtype, self.group = spec, device, dtype, group
        self.overlap_collectives = overlap_collectives
        self.vocab_rows = group.shard.vocab_rows(spec) if group else spec.vocab_size
        self.ops = ops or select_ops(device)
        self.last_nano_batches = 0
        self.w = {name: tensor.to(device=device, dtype=dtype) for name, tensor in weights.items()}
        check_weights(spec, self.w, self.vocab_rows)
        self.experts = [stack_experts(spec, self.w, i) for i in range(spec.num_layers)] if spec.num_experts else None
        fuse_projections(spec, self.w)
        stored: dict[str, int] = {}  # bytes of each projection as stored: a quantized one at its width, with scales

        def packed(name: str, weight: torch.Tensor | QuantizedWeight):  # quantized as planned, in the path's layout
            weight = quantization.apply(name, weight) if quantization else weight
            stored[name] = weight.nbytes
            return self.ops.pack_linear(weight)

        for name, tensor in self.w.items():  # the projections `_linear` reads
            if name.endswith(QUANTIZABLE):
                self.w[name] = packed(name, tensor)
        self.lm_head = packed("lm_head.weight", self.w["model.embed_tokens.weight"]) if spec.tie_word_embeddings \
            else self.w["lm_head.weight"]
        if spec.tie_word_embeddings and not (quantization and quantization.lm_head):
            stored.pop("lm_head.weight")  # the embedding itself, counted once
        def expert_products(layer: int, kind: str, weights: torch.Tensor | list[QuantizedWeight]):
            """Stacked for the grouped GEMM, or, quantized at load or in the folder, each expert's packed levels
            (multiplied one expert at a time)."""
            if isinstance(weights, torch.Tensor) and not quantization:
                return weights
            each = weights if isinstance(weights, list) else [stacked.T for stacked in weights]
            return [packed(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{kind}.weight", weight)
                    for e, weight in enumerate(each)]

        if self.experts:
            self.experts = [(router, expert_products(i, "gate_up_proj", gate_up), expert_products(i, "down_proj", down))
                            for i, (router, gate_up, down) in enumerate(self.experts)]
        # every weight's bytes as stored: what quantization saves
        self.weight_bytes = sum(stored.values()) + sum(t.nbytes for n, t in self.w.items() if n not in stored) + \
            sum(t.nbytes for layer in self.experts or [] for t in layer[1:] if isinstance(t, torch.Tensor))
        self._overlap = StreamOverlap()

    def _norm(self, x: torch.Tensor, weight: str) -> torch.Tensor:
        return self.ops.rms_norm(x, self.w[weight], self.spec.rms_norm_eps)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.ops.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor | list[object], ends: torch.Tensor) -> torch.Tensor:
        """The grouped GEMM over the experts' rows (sorted by expert, `ends` their cumulative counts): one product
        over stacked float weights, or, quantized, each expert's rows through the compute path's quantized product
        with its own levels (experts no token chose skipped)."""
        if isinstance(weights, torch.Tensor):
            return self.ops.grouped_matmul(x, weights, ends)
        bounds = [0, *ends.tolist()]
        return torch.cat([self.ops.linear(x[start:stop], weights[e], None)
                          for e, (start, stop) in enumerate(zip(bounds, bounds[1:])) if stop > start])

    def _moe(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Top-k routing with renormalised gates; the (token, expert) pairs sorted by expert go through one
        grouped GEMM per projection, each expert's rows against its own weights (one product per expert when
        they are quantized)."""
        router, gate_up, down = self.experts[layer]
        probs = torch.softmax(F.linear(x, router).float(), dim=-1)
        weights, chosen = probs.topk(self.spec.num_experts_per_tok, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        order = chosen.flatten().argsort(stable=True)
        tokens = order // self.spec.num_experts_per_tok
        ends = torch.bincount(chosen.flatten(), minlength=self.spec.num_experts).cumsum(0).to(torch.int32)
        y = self._grouped(self.ops.silu_and_mul(self._grouped(x[tokens], gate_up, ends)), down, ends)
        y = y * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, tokens, y)

    def _mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        prefix = f"model.layers.{layer}."
        if not self.spec.num_experts:
            hidden = self.ops.silu_and_mul(self._linear(x, prefix + "mlp.gate_up_proj"))
            return self._linear(hidden, prefix + "mlp.down_proj")
        out = self._moe(x, layer)
        if self.spec.shared_intermediate_size:
            shared = self.ops.silu_and_mul(self._linear(x, prefix + "shared_mlp.input_linear"))
            out = out + self._linear(shared, prefix + "shared_mlp.output_linear")
        return out

    def _attention(self, x: torch.Tensor, layer: int, step: StepInputs, cache: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        spec, prefix = self.spec, f"model.layers.{layer}.self_attn."
        qkv = self._linear(x, prefix + "qkv_proj").view(-1, spec.num_heads + 2 * spec.num_kv_heads, spec.head_dim)
        qk = self.ops.rotary(qkv[:, :spec.num_heads + spec.num_kv_heads], *rope)  # queries and keys in one pass
        q, k, v = qk[:, :spec.num_heads], qk[:, spec.num_heads:], qkv[:, spec.num_heads + spec.num_kv_heads:]
        keys = cache[layer, 0].view(spec.num_kv_heads, spec.head_dim, -1)  # [kv heads, head dim, slots]
        values = cache[layer, 1].view(spec.num_kv_heads, -1, spec.head_dim)  # [kv heads, slots, head dim]
        self.ops.write_kv(k, v, keys, values, step.slots)  # the whole step's KV first: a span may read another's
        return self._linear(self.ops.attention(q, keys, values, step), prefix + "o_proj")

    def _attention_delta(self, x: torch.Tensor, layer: int, step: StepInputs, cache: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """What the attention block adds to the residual stream (before its multiplier): a tensor-parallel rank's
        partial sum."""
        return self._attention(self._norm(x, f"model.layers.{layer}.input_layernorm.weight"), layer, step, cache,
                               rope)

    def _mlp_delta(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return self._mlp(self._norm(x, f"model.layers.{layer}.post_attention_layernorm.weight"), layer)

    def _attention_block(self, x: torch.Tensor, layer: int, step: StepInputs, cache: torch.Tensor,
                         rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.add(x, self._attention_delta(x, layer, step, cache, rope), alpha=self.spec.residual_multiplier)

    def _mlp_block(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        return torch.add(x, self._mlp_delta(x, layer), alpha=self.spec.residual_multiplier)

    def _embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of the step's tokens; on a tensor-parallel rank, of those in its vocabulary rows (zeros for
        the others), summed over the ranks."""
        table = self.w["model.embed_tokens.weight"]
        if self.group is None:
            return F.embedding(token_ids, table)
        local = token_ids - self.group.rank * self.vocab_rows
        inside = (local >= 0) & (local < self.vocab_rows)
        x = F.embedding(local.clamp(0, self.vocab_rows - 1), table) * inside[:, None].to(table.dtype)
        self.group.all_reduce(x)
        return x

    def _sharded_layers(self, x: torch.Tensor, parts: list[tuple[slice, StepInputs]], cache: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Every layer of every part on a tensor-parallel rank, updating x in place. Each block's output is this
        rank's partial sum; it is all-reduced asynchronously, and a part waits for its own sum only when its next
        block needs x — so one nano-batch's all-reduce runs while the next one's attention or GEMMs compute
        (NanoFlow's overlap of the network). With overlap_collectives off, every all-reduce is waited for at once."""
        group, alpha = self.group, self.spec.residual_multiplier
        in_flight: list[tuple[torch.Tensor, Handle] | None] = [None] * len(parts)

        def settle(index: int) -> None:
            if in_flight[index] is not None:
                partial, work = in_flight[index]
                group.wait(work)
                x[parts[index][0]].add_(partial, alpha=alpha)
                in_flight[index] = None

        for layer in range(self.spec.num_layers):
            for block in ("attention", "mlp"):
                for index, (rows, sub) in enumerate(parts):
                    settle(index)
                    partial = self._attention_delta(x[rows], layer, sub, cache, (cos[rows], sin[rows])) \
                        if block == "attention" else self._mlp_delta(x[rows], layer)
                    in_flight[index] = (partial, group.all_reduce(partial, async_op=True))
                    if not self.overlap_collectives:
                        settle(index)
        for index in range(len(parts)):
            settle(index)

    @torch.inference_mode()
    def forward(self, step: StepInputs, cache: torch.Tensor, nano_batches: int = 1) -> torch.Tensor:
        """Final hidden states [T, d] for the packed step, computed as up to `nano_batches` nano-batches of whole
        spans per layer. On CUDA one nano-batch's attention runs on one stream while the previous one's MLP GEMMs
        run on another (NanoFlow's intra-layer overlap, `overlap.py`); elsewhere they run one after the other —
        the same math."""
        spec = self.spec
        x = self._embed(step.token_ids)
        if spec.embedding_multiplier != 1.0:
            x = x * spec.embedding_multiplier
        cos, sin = rope_tables(step.positions, spec.head_dim, spec.rope_theta)
        parts = step.nano_batches(nano_batches)
        self.last_nano_batches = len(parts)  # what the step was split into, for the serving metrics
        if self.group is not None:
            self._sharded_layers(x, parts, cache, cos, sin)
        elif x.is_cuda and len(parts) > 1:
            self._overlap.run(x, parts, spec.num_layers, cos, sin,
                              lambda h, layer, sub, rope: self._attention_block(h, layer, sub, cache, rope),
                              self._mlp_block)
        else:
            for layer in range(spec.num_layers):
                for rows, sub in parts:
                    x[rows] = self._attention_block(x[rows], layer, sub, cache, (cos[rows], sin[rows]))
                    x[rows] = self._mlp_block(x[rows], layer)
        return self._norm(x, "model.norm.weight")

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits of every row of `hidden`; on a tensor-parallel rank other than 0, None (rank 0 gathers
        every rank's vocabulary slice)."""
        logits = self.ops.linear(hidden, self.lm_head, None).float()
        if self.group is not None:
            logits = self.group.gather(logits)
            if logits is None:
                return None
            logits = logits[:, :self.spec.vocab_size]
        return logits if self.spec.logits_multiplier == 1.0 else logits * self.spec.logits_multiplier
