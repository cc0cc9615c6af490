"""A Hugging Face folder's weights as rung's inference model uses them: read from (possibly sharded) safetensors,
checked against config.json, fused where one GEMM can replace several, and MoE experts stacked for the grouped
GEMM, whichever of the two folder layouts (Mixtral's per-expert matrices, Granite's stacked ones) they come in."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rung.errors import RungError
from rung.platform.tensor_files import load_tensors
from rung.serving.worker.compressed_tensors import read_quantized
from rung.serving.worker.model_spec import ModelSpec, read_config
from rung.serving.worker.quantization import QuantizedWeight, holds_levels

# router [E, d], then gate|up and down: stacked [E, d, 2f] and [E, f, d] for the grouped GEMM, or, from a quantized
# folder, each expert's own QuantizedWeight ([2f, d] and [d, f], output rows first)
Experts = tuple[torch.Tensor, torch.Tensor | list[QuantizedWeight], torch.Tensor | list[QuantizedWeight]]


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a (possibly sharded) checkpoint, each checked to be there."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    for name in files:
        if not (folder / name).is_file():
            raise RungError(f"{folder} is missing its weights file {name}")
    return files


def load_weights(folder: str | Path) -> dict[str, torch.Tensor | QuantizedWeight]:
    """Every tensor of a (possibly sharded) safetensors checkpoint; the layers a quantized folder
    (`compressed_tensors.py`) holds as levels, as QuantizedWeights."""
    folder = Path(folder)
    weights = {}
    for name in weight_files(folder):
        weights.update(load_tensors(folder / name))
    config = read_config(folder / "config.json").get("quantization_config")
    if config is None:
        return weights
    weights = read_quantized(weights, config)
    beyond = [name for name, w in weights.items() if isinstance(w, QuantizedWeight) and not holds_levels(name)]
    if beyond:
        raise RungError(f"{folder}: {beyond[0].removesuffix('.weight')} is quantized; rung's engine reads only the "
                        "attention and MLP projections, Mixtral-layout experts' w1, w2 and w3 and the readout as "
                        "levels from a folder (embeddings, norms and routers stay float)")
    return weights


def expected_shapes(spec: ModelSpec, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
    """The shapes config.json implies for the tensors every supported architecture has; `vocab_rows`: the
    embedding's and readout's rows when they are a tensor-parallel rank's share of the vocabulary."""
    d, q, kv = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    vocab = vocab_rows or spec.vocab_size
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    f, experts, shared = spec.intermediate_size, spec.num_experts, spec.shared_intermediate_size
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        shapes.update({prefix + "self_attn.q_proj.weight": (q, d), prefix + "self_attn.k_proj.weight": (kv, d),
                       prefix + "self_attn.v_proj.weight": (kv, d), prefix + "self_attn.o_proj.weight": (d, q),
                       prefix + "input_layernorm.weight": (d,), prefix + "post_attention_layernorm.weight": (d,)})
        moe = prefix + "block_sparse_moe."
        if not experts:
            shapes.update({prefix + "mlp.gate_proj.weight": (f, d), prefix + "mlp.up_proj.weight": (f, d),
                           prefix + "mlp.down_proj.weight": (d, f)})
        elif spec.family == "granite":
            shapes.update({moe + "input_linear.weight": (experts, 2 * f, d),
                           moe + "output_linear.weight": (experts, d, f), moe + "router.layer.weight": (experts, d)})
        else:
            shapes[moe + "gate.weight"] = (experts, d)
            for e in range(experts):
                shapes.update({f"{moe}experts.{e}.w1.weight": (f, d), f"{moe}experts.{e}.w3.weight": (f, d),
                               f"{moe}experts.{e}.w2.weight": (d, f)})
        if shared:
            shapes.update({prefix + "shared_mlp.input_linear.weight": (2 * shared, d),
                           prefix + "shared_mlp.output_linear.weight": (d, shared)})
    return shapes


def check_weights(spec: ModelSpec, w: dict[str, torch.Tensor], vocab_rows: int | None = None) -> None:
    """Refuse weights that do not match the config, naming what is missing, misshapen or beyond its layers (a
    config that says fewer layers than the weights hold would otherwise serve a truncated model)."""
    expected = expected_shapes(spec, vocab_rows)
    layers = {int(name.split(".")[2]) for name in w if name.startswith("model.layers.")}
    if layers and max(layers) >= spec.num_layers:
        raise RungError(f"the weights hold {max(layers) + 1} layers; config.json's num_hidden_layers is "
                        f"{spec.num_layers}")
    missing = [name for name in expected if name not in w]
    if missing:
        raise RungError(f"the weights do not match the config: missing {', '.join(missing[:5])}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    wrong = [f"{name} is {tuple(w[name].shape)}, the config implies {shape}"
             for name, shape in expected.items() if tuple(w[name].shape) != shape]
    if wrong:
        raise RungError(f"the weights do not match the config: {'; '.join(wrong[:3])}")


def fused_groups(spec: ModelSpec) -> dict[str, list[str]]:
    """Per layer, the projections the engine multiplies as one (`fuse_projections`): fused name → the folder's names
    of its parts, in order, all relative to `model.layers.N.`."""
    groups = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}
    if not spec.num_experts:
        groups["mlp.gate_up_proj"] = ["mlp.gate_proj", "mlp.up_proj"]
    return groups


def fuse_projections(spec: ModelSpec, w: dict[str, torch.Tensor | QuantizedWeight]) -> None:
    """One GEMM for q, k and v (queries scaled by the attention scale on the way) and one for gate and up, as
    vLLM does: fewer, larger products per layer, and no pass to scale the queries. Changes `w` in place."""
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        for fused, parts in fused_groups(spec).items():
            for kind in ("weight", "bias"):
                if f"{prefix}{parts[0]}.{kind}" in w:
                    tensors = [w.pop(f"{prefix}{part}.{kind}") for part in parts]
                    w[f"{prefix}{fused}.{kind}"] = QuantizedWeight.cat(tensors) \
                        if isinstance(tensors[0], QuantizedWeight) else torch.cat(tensors)
        for kind in ("weight", "bias"):  # queries come out scaled for attention (RoPE is linear)
            name = f"{prefix}self_attn.qkv_proj.{kind}"
            if name in w:
                rows = w[name].scales if isinstance(w[name], QuantizedWeight) else w[name]  # a row's scale scales it
                rows[:spec.num_heads * spec.head_dim] *= spec.attention_scale


def stack_experts(spec: ModelSpec, w: dict[str, torch.Tensor], layer: int) -> Experts:
    """(router, gate and up, down) of one MoE layer from either folder layout, stored as the grouped GEMM reads
    them (input features first), or as each expert's levels when the folder holds them quantized; the per-expert
    tensors are taken out of `w`."""
    prefix = f"model.layers.{layer}.block_sparse_moe."
    if spec.family == "granite":
        gate_up, down = w.pop(prefix + "input_linear.weight"), w.pop(prefix + "output_linear.weight")
        router = w[prefix + "router.layer.weight"]
    else:
        def each(name: str) -> list[torch.Tensor | QuantizedWeight]:
            return [w.pop(f"{prefix}experts.{e}.{name}.weight") for e in range(spec.num_experts)]

        gate, up, down, router = each("w1"), each("w3"), each("w2"), w[prefix + "gate.weight"]
        if any(isinstance(t, QuantizedWeight) for t in gate + up + down):
            if not all(isinstance(t, QuantizedWeight) for t in gate + up + down):
                raise RungError(f"layer {layer}'s experts are partly quantized; rung's engine reads a layer's experts "
                                "all as levels or all float")
            return router, [QuantizedWeight.cat([g, u]) for g, u in zip(gate, up)], down
        gate_up, down = torch.cat([torch.stack(gate), torch.stack(up)], dim=1), torch.stack(down)
    return router, gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
