"""Hyperparameter grids from the command line: `lr=2^-12:2^-4:x2`, `lr=2^-10:2^-6:x2^0.5`, `init_std=0.01,0.02`.

Short names map to config fields (lr → train.lr, init_std → param.init_std, ...); any dotted field path works too.
"""

from __future__ import annotations

import math
import re

from rung.errors import ConfigError

ALIASES = {"lr": "train.lr", "init_std": "param.init_std", "weight_decay": "train.weight_decay",
           "embedding_mult": "param.embedding_mult", "output_mult": "param.output_mult",
           "warmup_steps": "train.warmup_steps", "adam_eps": "train.adam_eps", "damping": "train.damping"}
_POWER = re.compile(r"^\s*(-?[\d.]+)\s*\^\s*(-?[\d.]+)\s*$")


def number(text: str) -> float:
    """'2^-8' (a power), '1e-3' or '0.02'."""
    match = _POWER.match(text)
    try:
        return float(match.group(1)) ** float(match.group(2)) if match else float(text)
    except (ValueError, OverflowError):
        raise ConfigError("--grid", f"{text!r} is not a number (use 0.01, 1e-2 or 2^-7)") from None


def parse_grid(spec: str) -> tuple[str, list[float]]:
    """(config field, values) from one --grid argument."""
    name, sep, body = spec.partition("=")
    if not sep or not name.strip() or not body.strip():
        raise ConfigError("--grid", f"expected NAME=VALUES, got {spec!r}")
    field = ALIASES.get(name.strip(), name.strip())
    if ":" in body:
        parts = body.split(":")
        if len(parts) != 3 or not parts[2].strip().startswith("x"):
            raise ConfigError("--grid", f"a range is START:STOP:xFACTOR (e.g. 2^-12:2^-4:x2), got {body!r}")
        start, stop, factor = number(parts[0]), number(parts[1]), number(parts[2].strip()[1:])
        if start <= 0 or stop <= 0 or factor <= 1:
            raise ConfigError("--grid", f"{spec!r}: a geometric range needs positive bounds and a factor > 1")
        count = math.floor(math.log(stop / start) / math.log(factor) + 1e-9) + 1
        values = [start * factor**i for i in range(max(count, 0))]
    else:
        values = [number(v) for v in body.split(",") if v.strip()]
    if not values:
        raise ConfigError("--grid", f"{spec!r} parses to no values")
    return field, values


def typed(cfg, field: str, value: float) -> int | float:
    """A grid value as the type of the dotted config field it sets (an int field takes an int)."""
    node = cfg
    for part in field.split("."):
        if not hasattr(node, part):
            raise ConfigError(field, "no such config field")
        node = getattr(node, part)
    return int(round(value)) if isinstance(node, int) and not isinstance(node, bool) else float(value)
