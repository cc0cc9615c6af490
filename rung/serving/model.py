"""rung's inference model for Llama-family, Mixtral and Granite folders, reading and writing a paged KV cache.

Hugging Face's modeling code keeps a contiguous cache per sequence; here every layer writes the step's keys and
values into cache slots first, then each request attends over the slots its block table names — so all requests
of a step, at any mix of prefill chunks and decodes, run as one packed batch of tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from rung.errors import RungError
from rung.serving.model_spec import ModelSpec


@dataclass
class StepInputs:
    """What one forward pass needs, built by the runner from a step plan."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot of each token
    spans: list[tuple[int, int, torch.Tensor]]  # per request: (first row in the batch, rows, its context's slots)


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
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None, :], emb.sin()[:, None, :]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding. x: [T, heads, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos.to(x.dtype) + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin.to(x.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


class InferenceModel:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.w = {name: tensor.to(dtype) for name, tensor in weights.items()}
        required = ["model.embed_tokens.weight", "model.norm.weight"] + \
            ([] if spec.tie_word_embeddings else ["lm_head.weight"])
        missing = [name for name in required + [f"model.layers.{spec.num_layers - 1}.self_attn.q_proj.weight"]
                   if name not in self.w]
        if missing:
            raise RungError(f"the weights do not match the config: missing {', '.join(missing)}")
        self.lm_head = self.w["model.embed_tokens.weight"] if spec.tie_word_embeddings else self.w["lm_head.weight"]
        self.experts = [self._experts(i) for i in range(spec.num_layers)] if spec.num_experts else None

    def _experts(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router [E, d], gate [E, f, d], up [E, f, d], down [E, d, f]) from either folder layout."""
        prefix = f"model.layers.{layer}.block_sparse_moe."
        if self.spec.family == "granite":
            gate, up = self.w[prefix + "input_linear.weight"].chunk(2, dim=1)
            return self.w[prefix + "router.layer.weight"], gate, up, self.w[prefix + "output_linear.weight"]
        experts = range(self.spec.num_experts)
        stack = lambda name: torch.stack([self.w[f"{prefix}experts.{e}.{name}.weight"] for e in experts])  # noqa
        return self.w[prefix + "gate.weight"], stack("w1"), stack("w3"), stack("w2")

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[name + ".weight"], self.w.get(name + ".bias"))

    def _moe(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Top-k routing with renormalised gates; each expert runs once on all of its tokens."""
        router, gate, up, down = self.experts[layer]
        probs = torch.softmax(F.linear(x, router).float(), dim=-1)
        weights, chosen = probs.topk(self.spec.num_experts_per_tok, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            rows, slot = torch.nonzero(chosen == expert, as_tuple=True)
            h = x[rows]
            y = F.linear(F.silu(F.linear(h, gate[expert])) * F.linear(h, up[expert]), down[expert])
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out

    def _mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        prefix = f"model.layers.{layer}."
        if not self.spec.num_experts:
            return self._linear(F.silu(self._linear(x, prefix + "mlp.gate_proj")) * self._linear(x, prefix +
                                                                                                 "mlp.up_proj"),
                                prefix + "mlp.down_proj")
        out = self._moe(x, layer)
        if self.spec.shared_intermediate_size:
            gate, up = self._linear(x, prefix + "shared_mlp.input_linear").chunk(2, dim=-1)
            out = out + self._linear(F.silu(gate) * up, prefix + "shared_mlp.output_linear")
        return out

    def _attention(self, x: torch.Tensor, layer: int, step: StepInputs, cache: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        spec, prefix = self.spec, f"model.layers.{layer}.self_attn."
        q = _rope(self._linear(x, prefix + "q_proj").view(-1, spec.num_heads, spec.head_dim), *rope)
        k = _rope(self._linear(x, prefix + "k_proj").view(-1, spec.num_kv_heads, spec.head_dim), *rope)
        v = self._linear(x, prefix + "v_proj").view(-1, spec.num_kv_heads, spec.head_dim)
        cache[layer, 0, step.slots] = k  # the whole step's KV first: a span may read another span's new blocks
        cache[layer, 1, step.slots] = v
        out = torch.empty_like(q)
        for first, rows, context in step.spans:
            keys, values = cache[layer, 0, context], cache[layer, 1, context]
            query_pos = step.positions[first:first + rows]
            mask = torch.arange(context.numel())[None, :] <= query_pos[:, None]
            out[first:first + rows] = F.scaled_dot_product_attention(
                q[first:first + rows].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=mask, scale=spec.attention_scale,
                enable_gqa=spec.num_kv_heads != spec.num_heads).transpose(0, 1)
        return self._linear(out.reshape(-1, spec.num_heads * spec.head_dim), prefix + "o_proj")

    @torch.inference_mode()
    def forward(self, step: StepInputs, cache: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, d] for the packed step."""
        spec = self.spec
        x = F.embedding(step.token_ids, self.w["model.embed_tokens.weight"]) * spec.embedding_multiplier
        rope = _rope_tables(step.positions, spec.head_dim, spec.rope_theta)
        for layer in range(spec.num_layers):
            prefix = f"model.layers.{layer}."
            h = _rms_norm(x, self.w[prefix + "input_layernorm.weight"], spec.rms_norm_eps)
            x = x + spec.residual_multiplier * self._attention(h, layer, step, cache, rope)
            h = _rms_norm(x, self.w[prefix + "post_attention_layernorm.weight"], spec.rms_norm_eps)
            x = x + spec.residual_multiplier * self._mlp(h, layer)
        return _rms_norm(x, self.w["model.norm.weight"], spec.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float() * self.spec.logits_multiplier
