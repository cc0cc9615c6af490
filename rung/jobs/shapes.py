"""Scaling a config's shape: the one place that says how a width or depth change maps onto model fields.

Width changes keep the head dimension and grow the number of heads (the μP convention; GQA keeps its ratio);
the base (proxy) shape of the parametrization is given explicitly, so every shape of a sweep, coordinate check or
ladder shares one base and the parametrization does the scaling.
"""

from __future__ import annotations

import copy

from rung.errors import ConfigError
from rung.jobs.config import RunConfig


def reshape(base: RunConfig, *, width: int | None = None, depth: int | None = None, experts: int | None = None,
            base_width: int | None = None, base_depth: int | None = None) -> RunConfig:
    """A copy of `base` at another width / depth / expert count, with the given base shape."""
    cfg = copy.deepcopy(base)
    if width is not None:
        head_dim = base.model.resolved_head_dim
        if width % head_dim:
            raise ConfigError("widths", f"width {width} is not a multiple of the head dim {head_dim}")
        heads = width // head_dim
        group = base.model.n_heads // base.model.resolved_kv_heads
        cfg.model.d_model, cfg.model.n_heads, cfg.model.head_dim = width, heads, head_dim
        cfg.model.n_kv_heads = max(heads // group, 1) if heads % group == 0 else None
    if depth is not None:
        cfg.model.n_layers = depth
    if experts is not None:
        if cfg.model.moe is None:
            raise ConfigError("experts", "expert counts need an MoE config (model.moe)")
        cfg.model.moe.n_experts = experts
        cfg.model.moe.top_k = min(cfg.model.moe.top_k, experts)
    cfg.param.base_width = base_width if base_width is not None else cfg.param.base_width
    cfg.param.base_depth = base_depth if base_depth is not None else cfg.param.base_depth
    return cfg
