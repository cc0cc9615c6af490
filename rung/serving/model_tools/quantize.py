"""`rung quantize`: a model folder rewritten with its attention and MLP projections (MoE experts' too) as int8 or int4
levels, each projection's width chosen by how much it matters, to meet an average budget of bits per weight.

Importance, as in the seed paper's mixed-precision allocation, is measured rather than assumed: the rise of the
model's loss on calibration text when that projection alone is held at int4 (the rest float), computed by rung's
inference model on the path it serves with. Every projection starts at int4; projections move to int8 in order of
loss rise per weight while the budget allows (a greedy knapsack by density).

- Budget: bits per quantized weight with the scales counted (an fp32 scale per row for int8, per group for int4),
  averaged over the projections by their sizes: int4 in groups of 128 is 4.25, int8 a little over 8.
- Units: the engine multiplies q, k and v as one product and gate and up as another, so each such group takes one
  width (`weights.fused_groups`); a layer's MoE experts take one width for their gates and ups and one for their
  downs (Mixtral's per-expert layout; Granite's stacked experts stay float in the folder, and `rung serve
  --quantization` quantizes them at load). Embeddings, norms, routers and the readout stay float.
- Calibration: `--calibration FILE` (text, or JSONL of {"text": ...}), else the validation split of the run a rung
  export came from (the CLI reads it: `jobs/export/calibration.py`), at most `--calibration-tokens` tokens in
  windows of the model's context.
- Output: compressed-tensors' pack-quantized folder (`worker/compressed_tensors.py`), built next to `--out` and
  renamed into place when complete, with the allocation and each unit's loss rise in `rung_quantization.json`
  and the model card.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rung.errors import RungError
from rung.platform.folders import refuse_unless_empty, staged_folder
from rung.platform.progress import Progress
from rung.platform.tensor_files import write_sharded
from rung.serving.config import EngineConfig
from rung.serving.model_tools.perplexity import read_documents, token_windows, window_cache, window_loss
from rung.serving.worker.compressed_tensors import quantization_config, weight_tensors
from rung.serving.worker.model import InferenceModel
from rung.serving.worker.model_spec import ModelSpec, load_spec, read_config
from rung.serving.worker.quantization import QUANTIZABLE, QuantizedWeight, quantize
from rung.serving.worker.runner import load_model
from rung.serving.worker.weights import fuse_projections, fused_groups, load_weights

SCALE_BITS = 32  # fp32 scales
REPORT = "rung_quantization.json"
EXPERT_UNIT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(gate_up|down)_proj")


def units(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> dict[str, list[list[str]]]:
    """Each unit's engine name → its products, each the folder's layers the engine multiplies as one: a fused
    projection's parts or a single projection (one product), or a layer's experts' gate and up, or their down
    (one product per expert; Mixtral's layout: Granite's stacked experts, 3-D, stay float in a folder)."""
    out: dict[str, list[list[str]]] = {}
    for layer in range(spec.num_layers):
        prefix = f"model.layers.{layer}."
        grouped = {prefix + part: prefix + fused for fused, parts in fused_groups(spec).items() for part in parts}
        for name, tensor in weights.items():
            layer_name = name.removesuffix(".weight")
            if name.startswith(prefix) and name.endswith(QUANTIZABLE) and tensor.dim() == 2 \
                    and "block_sparse_moe" not in name:
                out.setdefault(grouped.get(layer_name, layer_name), [[]])[0].append(layer_name)
        if spec.num_experts and spec.family != "granite":
            experts = prefix + "block_sparse_moe.experts."
            out[experts + "gate_up_proj"] = [[f"{experts}{e}.w1", f"{experts}{e}.w3"] for e in range(spec.num_experts)]
            out[experts + "down_proj"] = [[f"{experts}{e}.w2"] for e in range(spec.num_experts)]
    return out


def bits_per_weight(bits: int, features: int, group_size: int) -> float:
    return bits + SCALE_BITS / (features if bits == 8 else group_size)


def average_bits(allocation: dict[str, int], sizes: dict[str, tuple[int, int]], group_size: int) -> float:
    """Bits per weight over every unit (sizes: unit → (weights, input features))."""
    total = sum(n for n, _ in sizes.values())
    return sum(n * bits_per_weight(allocation[u], k, group_size) for u, (n, k) in sizes.items()) / total


def allocate(rises: dict[str, float], sizes: dict[str, tuple[int, int]], budget: float,
             group_size: int) -> dict[str, int]:
    """int8 for the units whose int4 loss rise per weight is largest, while the average stays within `budget`."""
    allocation = dict.fromkeys(sizes, 4)
    for unit in sorted(sizes, key=lambda u: rises[u] / sizes[u][0], reverse=True):
        trial = {**allocation, unit: 8}
        if average_bits(trial, sizes, group_size) <= budget + 1e-9:
            allocation = trial
    return allocation


def calibration_windows(calibration: str | torch.Tensor, model_dir: Path, context: int,
                        tokens: int) -> list[torch.Tensor]:
    """Windows of `context` tokens of a calibration file (read with the folder's tokenizer), or of token ids (a
    run's validation split)."""
    if isinstance(calibration, str):
        from rung.serving.api.state import load_tokenizer

        return token_windows(load_tokenizer(str(model_dir)), read_documents(calibration), context, tokens)
    return [window for window in calibration[:tokens].split(context) if len(window) > 1]


def hold_at_int4(model: InferenceModel, unit: str, products: list[list[str]], floats: dict[str, torch.Tensor],
                 group_size: int) -> Callable[[], None]:
    """`unit`'s weights in `model` replaced by their int4 levels; returns what puts the float ones back."""
    experts = EXPERT_UNIT.fullmatch(unit)
    if experts is None:
        key = unit + ".weight"
        kept = model.w[key]
        model.w[key] = model.ops.pack_linear(quantize(floats[key], 4, group_size))
        return lambda: model.w.__setitem__(key, kept)
    layer, position = int(experts[1]), 1 if experts[2] == "gate_up" else 2
    kept_layer = model.experts[layer]
    levels = [model.ops.pack_linear(quantize(torch.cat([floats[part + ".weight"] for part in product]), 4,
                                             group_size)) for product in products]
    model.experts[layer] = tuple(levels if index == position else t for index, t in enumerate(kept_layer))
    return lambda: model.experts.__setitem__(layer, kept_layer)


@torch.inference_mode()
def loss_rises(model: InferenceModel, floats: dict[str, torch.Tensor], unit_products: dict[str, list[list[str]]],
               windows: list[torch.Tensor], group_size: int) -> dict[str, float]:
    """Per unit, the mean loss per token with that unit alone at int4, minus the float model's."""
    cache = window_cache(model, max(len(w) for w in windows))
    tokens = sum(len(w) - 1 for w in windows)

    def loss() -> float:
        return sum(window_loss(model, w, cache) for w in windows) / tokens

    base, rises = loss(), {}
    progress = Progress("quantize: sensitivity", len(unit_products), "units")
    for index, (unit, products) in enumerate(unit_products.items(), 1):
        restore = hold_at_int4(model, unit, products, floats, group_size)
        rises[unit] = loss() - base
        restore()
        print(progress.line(index, index), file=sys.stderr, flush=True)
    return rises


def quantize_folder(model_dir: str, out: str, budget: float, calibration: str | torch.Tensor, group_size: int,
                    calibration_tokens: int, overwrite: bool = False) -> dict:
    """Write the quantized folder at `out`; returns the report (`REPORT`). `calibration`: a text file's path, or
    token ids (the CLI's default: the exporting run's validation split)."""
    source, target = Path(model_dir), Path(out)
    if group_size < 4 or group_size % 4:
        raise RungError(f"--group-size must be a positive multiple of 4 (the CPU kernel reads inputs in fours), got "
                        f"{group_size}")
    if calibration_tokens < 2:
        raise RungError(f"--calibration-tokens must be at least 2, got {calibration_tokens}")
    spec = load_spec(source)
    if read_config(source / "config.json").get("quantization_config"):
        raise RungError(f"{source} is already quantized (its config.json has a quantization_config); quantize the "
                        "float folder it came from")
    refuse_unless_empty(target, overwrite)
    weights = load_weights(source)
    unit_products = units(spec, weights)
    unit_layers = {unit: [layer for product in products for layer in product]
                   for unit, products in unit_products.items()}
    sizes = {u: (sum(weights[n + ".weight"].numel() for n in layers), weights[layers[0] + ".weight"].shape[1])
             for u, layers in unit_layers.items()}
    uneven = sorted({k for _, k in sizes.values() if k % group_size})
    if uneven:
        raise RungError(f"--group-size {group_size} does not divide the input features of every projection "
                        f"({', '.join(map(str, uneven))}); choose a divisor of each")
    lowest, highest = (average_bits(dict.fromkeys(sizes, b), sizes, group_size) for b in (4, 8))
    if not lowest <= budget <= highest:
        raise RungError(f"--bits-budget {budget:g} is outside what int4 and int8 can make of this model: "
                        f"{lowest:.3f} (all int4 in groups of {group_size}) to {highest:.3f} (all int8)")
    model = load_model(source, EngineConfig(), dict(weights))  # the engine fuses and packs its own copy
    windows = calibration_windows(calibration, source, spec.max_position_embeddings, calibration_tokens)
    if not windows:
        raise RungError("the calibration text holds fewer than 2 tokens")
    floats = dict(weights)
    fuse_projections(spec, floats)  # the weights as the engine multiplies them
    rises = loss_rises(model, floats, unit_products, windows, group_size)
    allocation = allocate(rises, sizes, budget, group_size)
    quantized = {layer: quantize(weights[layer + ".weight"], allocation[unit], group_size)
                 for unit, layers in unit_layers.items() for layer in layers}
    report = {"source": str(source), "bits_budget": budget, "average_bits": average_bits(allocation, sizes, group_size),
              "group_size": group_size,
              "calibration": calibration if isinstance(calibration, str) else "the exporting run's validation split",
              "calibration_tokens": sum(len(w) - 1 for w in windows),
              "units": {u: {"bits": allocation[u], "int4_loss_rise": rises[u], "weights": sizes[u][0]}
                        for u in unit_layers}}
    write_folder(source, target, weights, quantized, report)
    return report


def write_folder(source: Path, target: Path, weights: dict[str, torch.Tensor],
                 quantized: dict[str, QuantizedWeight], report: dict) -> None:
    """The source folder's files with the quantized layers' tensors, config and card; in place only when whole."""
    with staged_folder(target) as staging:
        for path in source.iterdir():
            weights_file = path.suffix == ".safetensors" or path.name == "model.safetensors.index.json"
            if path.is_file() and not weights_file and path.name != REPORT:
                shutil.copy2(path, staging / path.name)
        tensors = {name: t for name, t in weights.items() if name.removesuffix(".weight") not in quantized}
        for layer, weight in quantized.items():
            tensors.update(weight_tensors(layer, weight))
        write_sharded(tensors, staging)
        config = read_config(source / "config.json")
        config["quantization_config"] = quantization_config(quantized, ignore=["lm_head"])
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / REPORT).write_text(json.dumps(report, indent=2))
        widths = " and ".join(f"int{b}" for b in sorted({u["bits"] for u in report["units"].values()}))
        with (staging / "README.md").open("a") as card:
            card.write(f"\n\n## Quantization\n\n`rung quantize`: projections at {widths} (groups of "
                       f"{report['group_size']} for int4), {report['average_bits']:.3f} bits per weight with scales "
                       f"(budget {report['bits_budget']:g}); each projection's width and its loss rise at int4 on "
                       f"{report['calibration_tokens']:,} calibration tokens: `{REPORT}`.\n")
