"""Analytic parameter and FLOP counts, from the config alone (no model is built).

MFU and the scaling ladder rest on these numbers, so tests check them against `named_parameters()` and torch's
FLOP counter. Conventions (Kaplan; PaLM appendix B):
- non-embedding parameters exclude the token embedding and an untied LM head;
- active parameters count, per token, only the top_k routed experts of each MoE layer;
- training FLOPs per token = 6 · (active parameters that take part in a matmul, the LM head included even when
  tied) + 12 · n_layers · n_heads · head_dim · seq_len for attention scores and values (causal masking not
  discounted, as in PaLM's MFU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rung.jobs.config import ModelConfig


@dataclass(frozen=True, slots=True)
class ModelSize:
    total_params: int
    embedding_params: int  # token embedding + untied readout
    non_embedding_params: int
    active_params: int  # per token
    flops_per_token: int  # one training step (forward + backward) for one token at seq_len

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def count(cfg: ModelConfig, seq_len: int) -> ModelSize:
    d, hd, layers = cfg.d_model, cfg.resolved_head_dim, cfg.n_layers
    attention = d * cfg.n_heads * hd * 2 + d * cfg.resolved_kv_heads * hd * 2
    ffn = 3 * d * cfg.ffn_hidden
    norms = 2 * d
    if cfg.moe is None:
        ffn_total = ffn_active = ffn
    else:
        shared = ffn if cfg.moe.shared_expert else 0
        router = d * cfg.moe.n_experts
        ffn_total = router + cfg.moe.n_experts * ffn + shared
        ffn_active = router + cfg.moe.top_k * ffn + shared
    embedding = cfg.vocab_size * d
    readout = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    final_norm = d
    total = embedding + readout + final_norm + layers * (attention + ffn_total + norms)
    active = total - layers * (ffn_total - ffn_active)
    matmul = layers * (attention + ffn_active) + cfg.vocab_size * d
    flops = 6 * matmul + 12 * layers * cfg.n_heads * hd * seq_len
    return ModelSize(total_params=total, embedding_params=embedding + readout,
                     non_embedding_params=total - embedding - readout, active_params=active, flops_per_token=flops)
