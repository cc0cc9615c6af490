"""Hyperparameter transfer: a sweep's best values at the proxy shape become the target's base hyperparameters.

The target keeps its own shape and takes the proxy shape as its parametrization's base shape, and the optimizer
settings the sweep ran with; the per-group multipliers then follow from the rules
(rung.jobs.params.parametrization). Nothing is rescaled here by hand. The
record says which loss chose the values (`loss_used`: validation, or training where the sweep had no split).
"""

from __future__ import annotations

import json
from pathlib import Path

from rung.config import evolve
from rung.errors import ConfigError, RungError
from rung.jobs.config import RunConfig
from rung.jobs.experiments.grid import typed


def apply_transfer(cfg: RunConfig, summary_path: str | Path) -> tuple[RunConfig, dict]:
    """(the config with the sweep's values and base shape, the provenance record)."""
    path = Path(summary_path)
    if path.is_dir():
        path = path / "summary.json"
    if not path.is_file():
        raise RungError(f"--hparams-from: {path} not found (point it at a sweep's summary.json)")
    try:
        summary = json.loads(path.read_text())
        transfer = summary["transfer"]
    except (ValueError, KeyError):
        raise RungError(f"--hparams-from: {path} is not a rung sweep summary") from None
    choice = transfer.get(cfg.param.name)
    if choice is None:
        raise ConfigError("param.name", f"the sweep {path} has no successful {cfg.param.name!r} runs to transfer "
                          f"from (it has: {', '.join(transfer) or 'none'})")
    proxy = choice["proxy"]
    # the values were tuned for one optimizer, which comes with them (summaries older than the setting: AdamW)
    optimizer = summary.get("optimizer", {"train.optimizer": "adamw"})
    # the target must still be a valid shape, and not smaller than the proxy: evolve validates all of it
    cfg = evolve(cfg, {**{field: typed(cfg, field, value) for field, value in choice["values"].items()},
                       **optimizer, "param.base_width": proxy["width"], "param.base_depth": proxy["depth"]})
    record = {"sweep_id": summary["sweep_id"], "summary": str(path.resolve()), "parametrization": cfg.param.name,
              "proxy_shape": proxy, "target_shape": {"width": cfg.model.d_model, "depth": cfg.model.n_layers},
              "values": choice["values"], "optimizer": optimizer,
              # summaries written before validation splits existed were judged by training loss
              "loss_used": summary.get("loss_used", "training")}
    return cfg, record
