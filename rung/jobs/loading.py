"""Turn a CONFIG argument (a preset name or a YAML file) plus `--set` overrides into a validated RunConfig."""

from __future__ import annotations

from pathlib import Path

from rung.config import apply_overrides, from_dict, load_yaml, to_dict
from rung.errors import ConfigError
from rung.jobs.config import RunConfig
from rung.jobs.presets import PRESETS


def load_run_config(spec: str, overrides: list[str] | None = None) -> RunConfig:
    if spec in PRESETS:
        data = to_dict(PRESETS[spec]())
    elif Path(spec).suffix in (".yaml", ".yml") or Path(spec).exists():
        data = load_yaml(spec)
    else:
        raise ConfigError("", f"unknown config {spec!r}: not a preset ({', '.join(PRESETS)}) and not a file")
    return from_dict(RunConfig, apply_overrides(data, list(overrides or [])))
