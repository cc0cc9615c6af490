"""Quantized model folders in compressed-tensors' `pack-quantized` convention (the format llm-compressor writes and
vLLM and transformers load), so a folder `rung quantize` writes serves on other engines too, and theirs on rung's.

A quantized linear layer `NAME` is three safetensors tensors instead of `NAME.weight`:

    NAME.weight_packed  int32 [out, in * bits / 32]: levels + 2^(bits-1) (unsigned), 32 / bits to an int32 along the
                        input features, the first in the lowest bits
    NAME.weight_scale   float [out, in / group]  (one column for a per-row scale)
    NAME.weight_shape   int64 [2] = [out, in]

and config.json's `quantization_config` names each layer's scheme in `config_groups` (its `targets` list the layers
by name). rung reads symmetric int weights of 4 or 8 bits with per-row (`channel`) or per-`group` scales and no
activation quantization; anything else is refused with its reason.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rung.errors import RungError
from rung.serving.worker.model_spec import read_config
from rung.serving.worker.quantization import QuantizedWeight

FORMAT = "pack-quantized"
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def pack(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 levels [out, in] as the convention's int32 words [out, in * bits / 32]."""
    per_word = 32 // bits
    out, features = levels.shape
    if features % per_word:
        raise RungError(f"{features} input features do not fill whole int32 words of {bits}-bit levels")
    unsigned = (levels.to(torch.int64) + (1 << (bits - 1))).view(out, features // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (unsigned << shifts).sum(-1)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # the same bits, signed


def unpack(words: torch.Tensor, bits: int, features: int) -> torch.Tensor:
    """The int8 levels [out, features] of `pack`'s words."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    unsigned = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)
    return (unsigned.reshape(words.shape[0], -1)[:, :features] - (1 << (bits - 1))).to(torch.int8)


def weight_tensors(name: str, weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The three tensors that stand for layer `name`'s weight in a folder."""
    return {f"{name}.weight_packed": pack(weight.q, weight.bits), f"{name}.weight_scale": weight.scales.clone(),
            f"{name}.weight_shape": torch.tensor(list(weight.shape), dtype=torch.int64)}


def scheme(weight: QuantizedWeight) -> dict:
    """The `weights` arguments of the config group `weight` belongs to."""
    grouped = weight.scales.shape[1] > 1
    return {"num_bits": weight.bits, "type": "int", "symmetric": True, "strategy": "group" if grouped else "channel",
            "group_size": weight.group_size if grouped else None, "dynamic": False}


def quantization_config(weights: dict[str, QuantizedWeight], ignore: list[str]) -> dict:
    """config.json's `quantization_config` for layers quantized as `weights` (layer name → weight): one config group
    per distinct scheme, its targets the layers' names."""
    groups: dict[str, dict] = {}
    for name, weight in sorted(weights.items()):
        args = scheme(weight)
        key = f"{args['num_bits']}-{args['group_size']}"
        groups.setdefault(key, {"targets": [], "weights": args, "input_activations": None,
                                "output_activations": None, "format": FORMAT})["targets"].append(name)
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {f"group_{index}": group for index, group in enumerate(groups.values())},
            "ignore": ignore, "kv_cache_scheme": None}


def describe(model_dir: str | Path) -> str:
    """What a folder holds, as `--quantization` names it: none, int8, int4, or mixed (both widths). A folder without
    config.json (a hub id vLLM resolves; an app built around an injected engine) holds nothing rung can see."""
    path = Path(model_dir) / "config.json"
    config = read_config(path).get("quantization_config") if path.is_file() else None
    if not config:
        return "none"
    widths = {(group.get("weights") or {}).get("num_bits") for group in (config.get("config_groups") or {}).values()}
    return "mixed" if len(widths) > 1 else f"int{widths.pop()}" if widths else "none"


def _group_schemes(config: dict) -> list[tuple[list[str], dict]]:
    """Each config group's targets and weights' arguments, checked to be what rung computes."""
    if config.get("quant_method") != "compressed-tensors":
        raise RungError(f"quantization_config: quant_method {config.get('quant_method')!r} is not supported "
                        "(rung reads compressed-tensors folders)")
    if config.get("format") != FORMAT:
        raise RungError(f"quantization_config: format {config.get('format')!r} is not supported (rung reads {FORMAT})")
    schemes = []
    for label, group in (config.get("config_groups") or {}).items():
        args = group.get("weights") or {}
        problems = [f"{key} {args.get(key)!r}" for key, allowed in (("type", ("int",)), ("num_bits", (4, 8)),
                                                                    ("symmetric", (True,)),
                                                                    ("strategy", ("channel", "group")))
                    if args.get(key) not in allowed]
        if group.get("input_activations") or group.get("output_activations"):
            problems.append("activation quantization")
        if problems:
            raise RungError(f"quantization_config: {label} has {', '.join(problems)}; rung serves symmetric int4 or "
                            "int8 weights with per-row or per-group scales")
        schemes.append((group.get("targets") or [], args))
    return schemes


def _targets(target: str, name: str) -> bool:
    """compressed-tensors' three ways to name layers: exactly, by class (`Linear`), by `re:` pattern."""
    return target in (name, "Linear") or target.startswith("re:") and re.match(target[3:], name) is not None


def read_quantized(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor | QuantizedWeight]:
    """`tensors` with every quantized layer's three tensors replaced by one QuantizedWeight under `NAME.weight`."""
    schemes = _group_schemes(config)
    out: dict[str, torch.Tensor | QuantizedWeight] = {k: v for k, v in tensors.items()
                                                     if not k.endswith(SUFFIXES)}
    for key in tensors:
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")
        args = next((args for targets, args in schemes if any(_targets(t, name) for t in targets)), None)
        if args is None:
            raise RungError(f"{name} is quantized, but no quantization_config group targets it")
        missing = [suffix for suffix in SUFFIXES if f"{name}.{suffix}" not in tensors]
        if missing:
            raise RungError(f"{name} is quantized but has no {', '.join(missing)}")
        rows, features = (int(v) for v in tensors[f"{name}.weight_shape"].tolist())
        scales = tensors[f"{name}.weight_scale"].float()
        groups = features // args["group_size"] if args["strategy"] == "group" else 1
        bits = args["num_bits"]
        if tuple(scales.shape) != (rows, groups) or tuple(tensors[key].shape) != (rows, features * bits // 32):
            raise RungError(f"{name}'s packed weight or scales do not match its shape [{rows}, {features}] at "
                            f"{bits} bits and {groups} scale(s) per row")
        out[f"{name}.weight"] = QuantizedWeight(unpack(tensors[key], bits, features), scales, bits)
    return out
