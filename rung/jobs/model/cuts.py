"""Sub-networks of a trained model (`rung export --layers`, `--width-fraction`): which layers, attention heads and
feed-forward units a cut keeps.

Depth:
- `K`: the first K layers (1 ≤ K ≤ the model's depth).
- `every-N`: the last layer of every N in a row — layers N-1, 2N-1, … — as LayerDrop's "every other" pruning
  keeps every other layer; with N dividing the depth the final layer stays.

Width (DynaBERT's and MatFormer's nesting: a prefix of each kind of unit): a fraction f of every layer's query
heads, of its key/value heads (the first f of the groups, so each kept query head keeps its own key/value head) and
of its feed-forward units (every expert's and the shared expert's); the residual width d_model stays, so every
μP multiplier does too. f must leave whole heads, whole key/value groups and whole units.

A cut keeps its parent's forward multipliers, the residual multiplier included: under CompleteP / Depth-μP that
multiplier is the parent's depth's, (L_base / L)^α, and the cut's weights were trained with it, so its own depth's
would compute a different function. A run trained with `train.layerdrop` (`train/layerdrop.py`) trained its
sub-networks with exactly these multipliers. Nested widths are not trained for yet: export warns when a cut is of a
dimension the run did not train for.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from rung.errors import RungError
from rung.jobs.config import ModelConfig

PATTERN = re.compile(r"(?P<first>\d+)|every-(?P<every>\d+)")


def kept_layers(cut: str, depth: int) -> list[int]:
    """The parent's layer indices `cut` keeps, in order; a cut that names no layers or more than `depth` is
    refused."""
    match = PATTERN.fullmatch(cut.strip())
    if match is None:
        raise RungError(f"--layers {cut!r} is not K (the first K layers) or every-N (the last of every N)")
    if match["first"] is not None:
        count = int(match["first"])
        if not 1 <= count <= depth:
            raise RungError(f"--layers {count}: the model has {depth} layers; keep 1 to {depth}")
        return list(range(count))
    every = int(match["every"])
    if not 2 <= every <= depth:
        raise RungError(f"--layers every-{every}: N must be 2 to the model's depth {depth}")
    return [layer for layer in range(depth) if (layer + 1) % every == 0]


def cut_weights(weights: dict, kept: list[int]) -> dict:
    """rung's tensors with only the `kept` layers, renumbered from 0 in order."""
    position = {str(old): str(new) for new, old in enumerate(kept)}
    out = {}
    for name, tensor in weights.items():
        parts = name.split(".")
        if parts[0] != "layers":
            out[name] = tensor
        elif parts[1] in position:
            out[".".join(["layers", position[parts[1]], *parts[2:]])] = tensor
    return out


def _whole(count: int, fraction: float, what: str) -> int:
    kept = round(count * fraction)
    if kept < 1 or abs(kept - count * fraction) > 1e-6:
        raise RungError(f"--width-fraction {fraction:g} of {count} {what} is {count * fraction:g}, not a whole "
                        "number of at least 1; choose a fraction that divides them")
    return kept


def width_cut(model: ModelConfig, fraction: float) -> ModelConfig:
    """The config of `model` with a fraction of its heads and feed-forward units (head dim and d_model as they
    are)."""
    if not 0 < fraction <= 1:
        raise RungError(f"--width-fraction must be in (0, 1], got {fraction:g}")
    heads = _whole(model.n_heads, fraction, "attention heads")
    kv_heads = _whole(model.resolved_kv_heads, fraction, "key/value heads")
    hidden = _whole(model.ffn_hidden, fraction, "feed-forward units")
    return dataclasses.replace(model, n_heads=heads, n_kv_heads=kv_heads, head_dim=model.resolved_head_dim,
                               ffn_mult=hidden / model.d_model, ffn_multiple_of=1)


def cut_width(weights: dict[str, torch.Tensor], parent: ModelConfig, cut: ModelConfig) -> dict[str, torch.Tensor]:
    """rung's tensors of `parent` narrowed to `cut`'s heads and units: rows of the projections that produce them,
    columns of those that read them."""
    head_dim = parent.resolved_head_dim
    rows = {"q_proj": cut.n_heads * head_dim, "k_proj": cut.resolved_kv_heads * head_dim,
            "v_proj": cut.resolved_kv_heads * head_dim, "gate_proj": cut.ffn_hidden, "up_proj": cut.ffn_hidden}
    columns = {"o_proj": cut.n_heads * head_dim, "down_proj": cut.ffn_hidden}
    out = {}
    for name, tensor in weights.items():
        kind = name.split(".")[-2] if name.startswith("layers.") else None
        out[name] = tensor[:rows[kind]] if kind in rows else tensor[:, :columns[kind]] if kind in columns else tensor
    return {name: tensor.contiguous() for name, tensor in out.items()}
