"""What rung's inference modules need to know about a Hugging Face folder, read from its config.json.

One spec covers the Llama family (Llama, Mistral, Qwen2 with attention bias), Mixtral, and Granite/GraniteMoE/
GraniteMoeShared, whose embedding, attention, residual and logit multipliers are part of the architecture.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from rung.errors import RungError

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM",
             "GraniteForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSharedForCausalLM"}


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    num_experts: int  # 0 = dense
    num_experts_per_tok: int
    shared_intermediate_size: int  # 0 = no shared expert
    embedding_multiplier: float
    attention_scale: float
    residual_multiplier: float
    logits_multiplier: float
    eos_token_ids: tuple[int, ...]

    @property
    def family(self) -> str:
        return "granite" if self.architecture.startswith("Granite") else "llama"


def read_config(path: Path) -> dict:
    """config.json as a dict, or a RungError saying what is wrong with it."""
    try:
        config = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise RungError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise RungError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not isinstance(config, dict):
        raise RungError(f"{path} must hold a JSON object, not a {type(config).__name__}")
    return config


def check_config(path: Path, config: dict) -> None:
    """The dimensions the model is built from: present, of the right type, and consistent with each other."""
    def number(key: str, kind: type, default=None, positive: bool = True):
        value = config.get(key, default)
        if value is None:
            raise RungError(f"{path} lacks {key}")
        if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int) or \
                not math.isfinite(value) or (value <= 0 if positive else value < 0):
            raise RungError(f"{path}: {key} must be a {'positive ' if positive else ''}"
                            f"{'number' if kind is float else 'integer'}, got {value!r}")
        return value

    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        number(key, int)
    heads = config["num_attention_heads"]
    kv_heads = number("num_key_value_heads", int, heads)
    number("rms_norm_eps", float, 1e-6)
    number("max_position_embeddings", int, 2048)
    if config.get("head_dim") is not None:
        number("head_dim", int)
    elif config["hidden_size"] % heads:
        raise RungError(f"{path}: hidden_size {config['hidden_size']} is not divisible by num_attention_heads "
                        f"{heads} (and no head_dim is given)")
    if heads % kv_heads:
        raise RungError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")


def load_spec(folder: str | Path) -> ModelSpec:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise RungError(f"{folder} is not a Hugging Face model folder (no config.json)")
    config = read_config(path)
    architecture = (config.get("architectures") or ["?"])[0]
    if architecture not in SUPPORTED:
        raise RungError(f"unsupported architecture {architecture!r} in {path} (supported: {', '.join(sorted(SUPPORTED))})")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise RungError(f"rope scaling {rope.get('rope_type') or rope.get('type')!r} is not supported yet")
    check_config(path, config)
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    granite = architecture.startswith("Granite")
    eos = config.get("eos_token_id")
    generation = Path(folder) / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ModelSpec(
        architecture=architecture, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_layers=config["num_hidden_layers"], num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=head_dim,
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta") or config.get("rope_theta") or 10000.0,
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        attention_bias=config.get("attention_bias", architecture == "Qwen2ForCausalLM"),
        num_experts=config.get("num_local_experts", 0) if "Moe" in architecture or "Mixtral" in architecture else 0,
        num_experts_per_tok=config.get("num_experts_per_tok", 0),
        shared_intermediate_size=config.get("shared_intermediate_size", 0) if "Shared" in architecture else 0,
        embedding_multiplier=config.get("embedding_multiplier", 1.0) if granite else 1.0,
        attention_scale=config.get("attention_multiplier", 1 / math.sqrt(head_dim)) if granite else 1 / math.sqrt(head_dim),
        residual_multiplier=config.get("residual_multiplier", 1.0) if granite else 1.0,
        logits_multiplier=1.0 / config.get("logits_scaling", 1.0) if granite else 1.0,
        eos_token_ids=eos_ids,
    )
