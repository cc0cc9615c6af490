"""Build a model for a run config: shape from the model config, multipliers and init from the parametrization."""

from __future__ import annotations

from rung.jobs.config import RunConfig
from rung.jobs.model import Transformer
from rung.jobs.parametrization import Parametrization


def build_model(config: RunConfig, seed: int | None = None) -> tuple[Transformer, Parametrization]:
    param = Parametrization(config.param, config.model)
    model = Transformer(config.model, param.multipliers)
    param.init_weights(model, config.train.seed if seed is None else seed)
    return model, param
