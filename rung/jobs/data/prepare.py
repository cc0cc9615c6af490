"""The data a run trains on: its corpus tokenized into cached shards, checked against the model's vocabulary. Torch-
and DeepSpeed-free, so the coordinate check, sweeps and the pipeline prepare data without loading a trainer."""

from __future__ import annotations

from rung.errors import ConfigError
from rung.jobs.config import RunConfig
from rung.jobs.data.shards import PreparedData, prepare


def prepare_data(cfg: RunConfig, log=print, workers: int = 0, address: str | None = None) -> PreparedData:
    """Tokenize (or reuse) the corpus and check its vocabulary fits the model. `workers` > 0: on Ray Data."""
    data = prepare(cfg.data, log=log, workers=workers, address=address)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({data.vocab_size})")
    return data
