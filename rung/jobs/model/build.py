"""Build a model for a run config: shape from the model config, multipliers and init from the parametrization."""

from __future__ import annotations

from rung.jobs.config import RunConfig
from rung.jobs.model.expert_parallel import ExpertPlacement
from rung.jobs.model.transformer import Transformer
from rung.jobs.params.parametrization import Parametrization


def build_model(config: RunConfig, seed: int | None = None,
                placement: ExpertPlacement | None = None) -> tuple[Transformer, Parametrization]:
    """`placement`: this rank's share of the experts under expert parallelism (None: all of them)."""
    param = Parametrization(config.param, config.model)
    model = Transformer(config.model, param.multipliers, placement)
    param.init_weights(model, config.train.seed if seed is None else seed)
    return model, param
