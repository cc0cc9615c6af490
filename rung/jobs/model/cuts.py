"""Sub-networks of a trained model by depth: which of its layers a cut keeps (`rung export --layers`).

- `K`: the first K layers (1 ≤ K ≤ the model's depth).
- `every-N`: the last layer of every N in a row — layers N-1, 2N-1, … — as LayerDrop's "every other" pruning
  keeps every other layer; with N dividing the depth the final layer stays.

A cut keeps its parent's forward multipliers, the residual multiplier included: under CompleteP / Depth-μP that
multiplier is the parent's depth's, (L_base / L)^α, and the cut's weights were trained with it, so its own depth's
would compute a different function. Training for cuts (LayerDrop) is not built yet: every cut is of a network
trained whole, and export says so.
"""

from __future__ import annotations

import re

from rung.errors import RungError

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
