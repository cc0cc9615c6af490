"""Export a rung checkpoint as a standard Hugging Face model folder — the only interface between training and
serving, so it must be exact.

Formats:
- `llama` (default): dense models as LlamaForCausalLM, MoE models as MixtralForCausalLM. These architectures have
  no μP multipliers, so every multiplier is folded into a weight: embedding × embedding multiplier, query
  projection × (attention scale · √d_head), output and down projections × residual multiplier, LM head × readout
  multiplier, router × router multiplier (tied embeddings are untied when the two multipliers differ).
- `granite`: GraniteForCausalLM / GraniteMoeForCausalLM / GraniteMoeSharedForCausalLM, whose configs carry the
  embedding, residual and attention multipliers and logits scaling natively; only the router multiplier is folded.

Mixtral has no shared expert and Qwen2-MoE's is sigmoid-gated, so a rung MoE with its (ungated) shared expert is
exactly a GraniteMoeShared model: `--format granite`. Export refuses anything else it cannot represent exactly
(capacity-factor token dropping, a head dim Granite cannot express) instead of writing a subtly different model.
The folder is assembled in a temporary directory next to `--out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rung.config import from_dict, to_dict
from rung.errors import RungError
from rung.jobs.config import ModelConfig, ParamConfig
from rung.jobs.data.shards import TOKENIZER_FILE  # a run directory keeps its tokenizer under this name too
from rung.jobs.data.tokenizer import EOS
from rung.jobs.parametrization import Multipliers, Parametrization
from rung.platform.checkpoint import MANIFEST, CheckpointStore, verify

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    run_dir: Path
    state: dict
    model: ModelConfig
    param: ParamConfig


def find_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory, or a run directory's newest verified checkpoint; damaged ones are refused."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        problem = verify(path)
        if problem:
            raise RungError(f"{path} is an incomplete or damaged checkpoint: {problem}")
        checkpoint, run_dir = path, path.parent.parent
    elif (path / "checkpoints").is_dir():
        found = CheckpointStore(path / "checkpoints").latest()
        if found is None:
            raise RungError(f"{path} has no complete, verified checkpoint")
        checkpoint, run_dir = found[1], path
    else:
        raise RungError(f"{path} is neither a rung checkpoint (no {MANIFEST}) nor a run directory (no checkpoints/)")
    state = json.loads((checkpoint / "state.json").read_text())
    return Checkpoint(path=checkpoint, run_dir=run_dir, state=state, model=from_dict(ModelConfig, state["model"]),
                      param=from_dict(ParamConfig, state["param"]))


def _llama_weights(w: dict[str, torch.Tensor], cfg: ModelConfig, mult: Multipliers) -> tuple[dict, bool]:
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


def _granite_weights(w: dict[str, torch.Tensor], cfg: ModelConfig, mult: Multipliers) -> dict:
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


def _hf_config(cfg: ModelConfig, mult: Multipliers, fmt: str, tied: bool, eos_id: int, dtype: str):
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


def _write_tokenizer(run_dir: Path, out: Path, max_len: int) -> int:
    from tokenizers import Tokenizer

    source = run_dir / TOKENIZER_FILE
    if not source.is_file():
        raise RungError(f"the run directory {run_dir} has no {TOKENIZER_FILE}")
    tokenizer = Tokenizer.from_file(str(source))
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise RungError(f"{source} has no {EOS} token")
    shutil.copyfile(source, out / TOKENIZER_FILE)
    chat = tokenizer.token_to_id("<|im_end|>") is not None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "bos_token": EOS,
              "eos_token": "<|im_end|>" if chat else EOS, "pad_token": EOS, "unk_token": None,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "pad_token")}, indent=2))
    stops = [tokenizer.token_to_id("<|im_end|>"), eos_id] if chat else [eos_id]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": stops, "pad_token_id": eos_id}, indent=2))
    return eos_id


def _write_weights(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _model_card(ck: Checkpoint, fmt: str, architecture: str, mult: Multipliers) -> str:
    transfer = ck.run_dir / "transfer.json"
    provenance = transfer.read_text() if transfer.is_file() else "none (hyperparameters set directly)"
    return (f"# {ck.run_dir.name}\n\nTrained with rung; exported as `{architecture}` (`--format {fmt}`).\n\n"
            f"- checkpoint: `{ck.path}` (step {ck.state['step']}, {ck.state['tokens']:,} training tokens)\n"
            f"- parametrization: `{ck.param.name}`, base shape width {ck.param.base_width or ck.model.d_model}, "
            f"depth {ck.param.base_depth or ck.model.n_layers}\n"
            f"- forward multipliers: embedding {mult.embedding:g}, attention {mult.attention:g}, "
            f"residual {mult.residual:g}, output {mult.output:g}, router {mult.router:g}"
            f" ({'folded into the weights' if fmt == 'llama' else 'native Granite config fields'})\n\n"
            f"## Hyperparameter transfer\n\n```\n{provenance}\n```\n\n## rung model config\n\n"
            f"```json\n{json.dumps({'model': to_dict(ck.model), 'param': to_dict(ck.param)}, indent=2)}\n```\n")


def export(source: str | Path, out: str | Path, fmt: str = "llama", dtype: str = "float32",
           overwrite: bool = False, allow_dropless: bool = False, max_shard_bytes: int = 5 << 30) -> Path:
    """Write the Hugging Face folder for `source` (a checkpoint or run directory) at `out`; returns `out`."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise RungError(f"--out {out} exists and is not empty (pass --overwrite to replace it)")
    ck = find_checkpoint(source)
    check_exportable(ck.model, fmt, allow_dropless)
    mult = Parametrization(ck.param, ck.model).multipliers
    weights = load_file(str(ck.path / "model.safetensors"))
    if fmt == "llama":
        tensors, tied = _llama_weights(weights, ck.model, mult)
    else:
        tensors, tied = _granite_weights(weights, ck.model, mult), ck.model.tie_embeddings
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {name: t.to(torch_dtype) for name, t in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        eos_id = _write_tokenizer(ck.run_dir, staging, ck.model.max_seq_len)
        config = _hf_config(ck.model, mult, fmt, tied, eos_id, dtype)
        config.save_pretrained(staging)
        _write_weights(tensors, staging, max_shard_bytes)
        (staging / "README.md").write_text(_model_card(ck, fmt, config.architectures[0], mult))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
