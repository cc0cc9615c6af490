"""rung's weights under Hugging Face names, for the two export formats:

- `llama`: dense models as LlamaForCausalLM, MoE models as MixtralForCausalLM. These architectures have no μP
  multipliers, so every multiplier is folded into a weight: embedding × embedding multiplier, query projection ×
  (attention scale · √d_head), output and down projections × residual multiplier, LM head × readout multiplier,
  router × router multiplier (tied embeddings are untied when the two multipliers differ).
- `granite`: GraniteForCausalLM / GraniteMoeForCausalLM / GraniteMoeSharedForCausalLM, whose configs carry the
  embedding, residual and attention multipliers and logits scaling natively; only the router multiplier is folded.

What neither can represent exactly is refused (`check_exportable`) instead of written subtly different.
"""

from __future__ import annotations

import math

import torch

from rung.errors import RungError
from rung.jobs.config import ModelConfig
from rung.jobs.params.parametrization import Multipliers


def llama_weights(w: dict[str, torch.Tensor], cfg: ModelConfig, mult: Multipliers) -> tuple[dict, bool]:
    """Rename and fold rung's weights into Llama/Mixtral names. Returns (tensors, tied)."""
    q_fold = mult.attention * math.sqrt(cfg.resolved_head_dim)  # HF scales logits by 1/√d_head itself
    out = {"model.embed_tokens.weight": w["embed_tokens.weight"] * mult.embedding, "model.norm.weight": w["norm.weight"]}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out[dst + "input_layernorm.weight"] = w[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = w[src + "post_attention_layernorm.weight"]
        out[dst + "self_attn.q_proj.weight"] = w[src + "self_attn.q_proj.weight"] * q_fold
        for name in ("k_proj", "v_proj"):
            out[dst + f"self_attn.{name}.weight"] = w[src + f"self_attn.{name}.weight"]
        out[dst + "self_attn.o_proj.weight"] = w[src + "self_attn.o_proj.weight"] * mult.residual
        if cfg.moe is None:
            for name in ("gate_proj", "up_proj"):
                out[dst + f"mlp.{name}.weight"] = w[src + f"mlp.{name}.weight"]
            out[dst + "mlp.down_proj.weight"] = w[src + "mlp.down_proj.weight"] * mult.residual
            continue
        out[dst + "block_sparse_moe.gate.weight"] = w[src + "mlp.router.weight"] * mult.router
        for e in range(cfg.moe.n_experts):
            expert, target = f"{src}mlp.experts.{e}.", f"{dst}block_sparse_moe.experts.{e}."
            out[target + "w1.weight"] = w[expert + "gate_proj.weight"]
            out[target + "w3.weight"] = w[expert + "up_proj.weight"]
            out[target + "w2.weight"] = w[expert + "down_proj.weight"] * mult.residual
    readout = w["embed_tokens.weight"] if cfg.tie_embeddings else w["lm_head.weight"]
    tied = cfg.tie_embeddings and mult.embedding == 1.0 and mult.output == 1.0
    if not tied:  # folding different multipliers into one shared matrix is impossible: untie
        out["lm_head.weight"] = readout * mult.output
    return out, tied


def granite_weights(w: dict[str, torch.Tensor], cfg: ModelConfig, mult: Multipliers) -> dict:
    out = {"model.embed_tokens.weight": w["embed_tokens.weight"], "model.norm.weight": w["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = w["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            out[dst + f"{name}.weight"] = w[src + f"{name}.weight"]
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[dst + f"self_attn.{name}.weight"] = w[src + f"self_attn.{name}.weight"]
        if cfg.moe is None:
            for name in ("gate_proj", "up_proj", "down_proj"):
                out[dst + f"mlp.{name}.weight"] = w[src + f"mlp.{name}.weight"]
            continue
        experts = range(cfg.moe.n_experts)
        out[dst + "block_sparse_moe.router.layer.weight"] = w[src + "mlp.router.weight"] * mult.router
        out[dst + "block_sparse_moe.input_linear.weight"] = torch.stack(  # [E, 2·ffn, d]: gate rows, then up rows
            [torch.cat([w[f"{src}mlp.experts.{e}.gate_proj.weight"], w[f"{src}mlp.experts.{e}.up_proj.weight"]])
             for e in experts])
        out[dst + "block_sparse_moe.output_linear.weight"] = torch.stack(
            [w[f"{src}mlp.experts.{e}.down_proj.weight"] for e in experts])
        if cfg.moe.shared_expert:
            out[dst + "shared_mlp.input_linear.weight"] = torch.cat(
                [w[src + "mlp.shared_expert.gate_proj.weight"], w[src + "mlp.shared_expert.up_proj.weight"]])
            out[dst + "shared_mlp.output_linear.weight"] = w[src + "mlp.shared_expert.down_proj.weight"]
    return out


def hf_config(cfg: ModelConfig, mult: Multipliers, fmt: str, tied: bool, eos_id: int, dtype: str):
    from transformers import GraniteConfig, GraniteMoeConfig, GraniteMoeSharedConfig, LlamaConfig, MixtralConfig

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.ffn_hidden,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                  num_key_value_heads=cfg.resolved_kv_heads, max_position_embeddings=cfg.max_seq_len,
                  rms_norm_eps=cfg.norm_eps, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                  hidden_act="silu", tie_word_embeddings=tied, bos_token_id=eos_id, eos_token_id=eos_id,
                  pad_token_id=None, dtype=dtype)
    moe = cfg.moe
    experts = {} if moe is None else dict(num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                                          router_aux_loss_coef=moe.aux_loss_coef)
    if fmt == "llama":
        common["head_dim"] = cfg.resolved_head_dim
        if moe is None:
            return LlamaConfig(**common, attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"])
        return MixtralConfig(**common, **experts, router_jitter_noise=0.0, sliding_window=None,
                             architectures=["MixtralForCausalLM"])
    native = dict(embedding_multiplier=mult.embedding, residual_multiplier=mult.residual,
                  attention_multiplier=mult.attention, logits_scaling=1.0 / mult.output, attention_bias=False)
    if moe is None:
        return GraniteConfig(**common, **native, mlp_bias=False, architectures=["GraniteForCausalLM"])
    if moe.shared_expert:
        return GraniteMoeSharedConfig(**common, **native, **experts, shared_intermediate_size=cfg.ffn_hidden,
                                      architectures=["GraniteMoeSharedForCausalLM"])
    return GraniteMoeConfig(**common, **native, **experts, architectures=["GraniteMoeForCausalLM"])


def check_exportable(cfg: ModelConfig, fmt: str, allow_dropless: bool) -> None:
    if cfg.moe is not None and cfg.moe.capacity_factor is not None and not allow_dropless:
        raise RungError(f"the model drops tokens beyond capacity (model.moe.capacity_factor = "
                        f"{cfg.moe.capacity_factor}); Mixtral and GraniteMoE route every token. Pass "
                        "--allow-dropless to export it as the dropless model (standard at inference)")
    if fmt == "llama" and cfg.moe is not None and cfg.moe.shared_expert:
        raise RungError("a shared expert cannot be represented in the llama format (Mixtral has none): "
                        "use --format granite (GraniteMoeShared)")
    if fmt == "granite" and cfg.resolved_head_dim * cfg.n_heads != cfg.d_model:
        raise RungError(f"Granite derives head_dim from d_model / n_heads; this model's head_dim "
                        f"{cfg.resolved_head_dim} differs: use --format llama")
