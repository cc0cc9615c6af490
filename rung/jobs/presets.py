"""Named configs that ship inside the package, so `rung train tiny` works right after `pip install`."""

from __future__ import annotations

from collections.abc import Callable

from rung.config import evolve
from rung.jobs.config import DataConfig, ModelConfig, MoEConfig, ParamConfig, RunConfig, TrainConfig


def tiny() -> RunConfig:
    """A 2-layer, 64-wide μP model that trains in well under a minute on one CPU core."""
    return RunConfig(
        name="tiny",
        model=ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
        param=ParamConfig(name="mup", base_width=64, base_depth=2),
        # 4 MB of the built-in corpus is ~300 files: 2 % holds out 7 of them for validation (0.5 % would be 2)
        data=DataConfig(vocab_size=2048, max_bytes=4_000_000, validation_fraction=0.02),
        train=TrainConfig(steps=200, seq_len=128, global_batch=16, micro_batch=8, lr=1e-2, warmup_steps=20),
    )


def tiny_moe() -> RunConfig:
    """The tiny model with 4 experts, top-2 routing and capacity factor 1.25."""
    return evolve(tiny(), {"name": "tiny-moe", "model.moe": MoEConfig(n_experts=4, top_k=2, capacity_factor=1.25)})


def small() -> RunConfig:
    """A 4-layer, 256-wide CompleteP model with its base shape at the tiny proxy (64 wide, 2 deep)."""
    return RunConfig(
        name="small",
        model=ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, max_seq_len=512),
        param=ParamConfig(name="completep", base_width=64, base_depth=2),
        data=DataConfig(vocab_size=8192, max_bytes=16_000_000, validation_fraction=0.02),
        train=TrainConfig(steps=1000, seq_len=256, global_batch=32, micro_batch=8, lr=1e-2, warmup_steps=50),
    )


PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "tiny-moe": tiny_moe, "small": small}
