"""Scaling a config's shape: the one place that says how a width or depth change maps onto model fields.

Width changes keep the head dimension and grow the number of heads (the μP convention; GQA keeps its ratio);
the base (proxy) shape of the parametrization is given explicitly, so every shape of a sweep, coordinate check or
ladder shares one base and the parametrization does the scaling.
"""

from __future__ import annotations

from rung.config import evolve
from rung.errors import ConfigError
from rung.jobs.config import RunConfig


def reshape(base: RunConfig, *, width: int | None = None, depth: int | None = None, experts: int | None = None,
            base_width: int | None = None, base_depth: int | None = None) -> RunConfig:
    """A copy of `base` at another width / depth / expert count, with the given base shape."""
    changes: dict[str, object] = {}
    if width is not None:
        head_dim = base.model.resolved_head_dim
        if width % head_dim:
            raise ConfigError("widths", f"width {width} is not a multiple of the head dim {head_dim}")
        heads = width // head_dim
        group = base.model.n_heads // base.model.resolved_kv_heads
        changes.update({"model.d_model": width, "model.n_heads": heads, "model.head_dim": head_dim,
                        "model.n_kv_heads": max(heads // group, 1) if heads % group == 0 else None})
    if depth is not None:
        changes["model.n_layers"] = depth
    if experts is not None:
        if base.model.moe is None:
            raise ConfigError("experts", "expert counts need an MoE config (model.moe)")
        changes.update({"model.moe.n_experts": experts, "model.moe.top_k": min(base.model.moe.top_k, experts)})
    if base_width is not None:
        changes["param.base_width"] = base_width
    if base_depth is not None:
        changes["param.base_depth"] = base_depth
    return evolve(base, changes)
