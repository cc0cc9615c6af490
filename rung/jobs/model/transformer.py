"""The rung model family: a pre-norm decoder-only transformer, dense or Mixture-of-Experts, readable top to bottom.

Multipliers come in as numbers from the parametrization (rung.jobs.params.parametrization) and are only multiplied here;
SP is simply the parametrization whose multipliers are one. Module names match Hugging Face Llama/Mixtral where
they can, which keeps export a renaming rather than a translation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from rung.jobs.config import ModelConfig, Recompute
from rung.jobs.model.expert_parallel import ExpertPlacement
from rung.jobs.model.layers import Attention, RMSNorm, SwiGLU, rope_tables
from rung.jobs.model.moe import MoEFeedForward, RouterStats
from rung.jobs.params.parametrization import Multipliers
from rung.jobs.params.roles import Role, tag


class ModelOutput(NamedTuple):  # a NamedTuple so DeepSpeed ZeRO-3 hooks can find the tensors inside
    logits: torch.Tensor  # [batch, seq, vocab]
    router_loss: torch.Tensor  # weighted MoE auxiliary + z losses summed over layers (0 for dense models)
    router_stats: list[RouterStats]  # one per MoE layer


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, mult: float):
        super().__init__()
        self.mult = mult
        self.weight = nn.Parameter(torch.empty(vocab_size, d_model))
        tag(self, Role.EMBEDDING)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight) * self.mult


class Readout(nn.Module):
    """The LM head; with tied embeddings it owns no weight and reads the embedding's."""

    def __init__(self, vocab_size: int, d_model: int, mult: float, tied: bool):
        super().__init__()
        self.mult = mult
        self.weight = None if tied else nn.Parameter(torch.empty(vocab_size, d_model))
        tag(self, Role.READOUT)

    def forward(self, hidden: torch.Tensor, tied_weight: torch.Tensor) -> torch.Tensor:
        weight = tied_weight if self.weight is None else self.weight
        return F.linear(hidden, weight) * self.mult


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mult: Multipliers, placement: ExpertPlacement | None = None):
        super().__init__()
        self.recompute_ffn = False  # selective activation checkpointing: keep attention, recompute the FFN
        self.residual = mult.residual
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, Role.BLOCK_NORM)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.resolved_kv_heads, cfg.resolved_head_dim,
                                   mult.attention)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, Role.BLOCK_NORM)
        self.mlp = (MoEFeedForward(cfg.d_model, cfg.ffn_hidden, cfg.moe, mult.router, placement) if cfg.moe
                    else SwiGLU(cfg.d_model, cfg.ffn_hidden))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        x = x + self.residual * self.self_attn(self.input_layernorm(x), cos, sin)
        # recomputing pays only where autograd would keep activations (not in evaluation or serving)
        ffn, stats = (checkpoint(self._ffn, x, use_reentrant=False) if self.recompute_ffn and torch.is_grad_enabled()
                      else self._ffn(x))
        return x + self.residual * ffn, stats

    def _ffn(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats | None]:
        ffn = self.mlp(self.post_attention_layernorm(x))
        return ffn if isinstance(ffn, tuple) else (ffn, None)



class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, mult: Multipliers, placement: ExpertPlacement | None = None):
        super().__init__()
        self.cfg = cfg
        self.expert_placement = placement
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.d_model, mult.embedding)
        self.layers = nn.ModuleList(Block(cfg, mult, placement) for _ in range(cfg.n_layers))
        self.residual_out = nn.Identity()  # the final residual stream, named so coordinate checks can hook it
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, Role.FINAL_NORM)
        self.lm_head = Readout(cfg.vocab_size, cfg.d_model, mult.output, cfg.tie_embeddings)
        cos, sin = rope_tables(cfg.resolved_head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.recompute_blocks = False

    def checkpoint_activations(self, mode: Recompute) -> None:
        """Trade compute for memory in training: `full` keeps only each block's input and recomputes the block in
        backward; `selective` keeps the attention outputs and recomputes the FFN (or MoE layer) — its hidden
        activations are the largest per token. Non-reentrant torch checkpointing, so it composes with ZeRO-3's
        parameter hooks and expert parallelism's all-to-alls (recomputed on every rank alike); the losses and
        gradients are those without it."""
        self.recompute_blocks = mode == "full"
        for layer in self.layers:
            layer.recompute_ffn = mode == "selective"

    def forward(self, input_ids: torch.Tensor, layers: Sequence[int] | None = None) -> ModelOutput:
        """`layers`: the sub-network of only these blocks, in this order (a depth cut, `cuts.py`); None: all."""
        seq = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[:seq].to(x.dtype), self.rope_sin[:seq].to(x.dtype)
        stats: list[RouterStats] = []
        blocks = self.layers if layers is None else [self.layers[i] for i in layers]
        for layer in blocks:
            if self.recompute_blocks and torch.is_grad_enabled():
                x, layer_stats = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x, layer_stats = layer(x, cos, sin)
            if layer_stats is not None:
                stats.append(layer_stats)
        logits = self.lm_head(self.norm(self.residual_out(x)), self.embed_tokens.weight)
        router_loss = x.new_zeros((), dtype=torch.float32)
        if self.cfg.moe is not None:
            for s in stats:
                router_loss = router_loss + self.cfg.moe.aux_loss_coef * s.aux_loss + self.cfg.moe.z_loss_coef * s.z_loss
        return ModelOutput(logits=logits, router_loss=router_loss, router_stats=stats)


def token_cross_entropy(output: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every position in fp32, [batch, seq]."""
    return F.cross_entropy(output.logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def language_model_loss(output: ModelOutput, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise, cross-entropy alone): mean next-token cross-entropy plus the router losses."""
    ce = token_cross_entropy(output, targets).mean()
    return ce + output.router_loss, ce


@torch.no_grad()
def greedy_decode(model: Transformer, prompt: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The reference decoder: argmax of a full forward pass per new token (no cache). prompt: [batch, seq]."""
    tokens = prompt
    for _ in range(max_new_tokens):
        next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[:, prompt.shape[1]:]
