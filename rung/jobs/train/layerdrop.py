"""LayerDrop (Fan et al., "Reducing Transformer Depth on Demand with Structured Dropout"): each optimizer step trains
a random sub-network of whole layers, so that depth cuts (`rung export --layers`, `model/cuts.py`) serve without
retraining.

- Which layers: each is dropped with probability p independently, drawn from a generator seeded by the run's seed
  and the step, so every worker drops the same layers in a step (ZeRO's reductions and expert parallelism's
  all-to-alls stay matched) and a resumed run draws what the uninterrupted one drew. At least one layer is kept.
- Schedule: p rises linearly from 0 to `train.layerdrop` over the LR warmup (a network learns whole before it
  learns to lose layers), then stays.
- A dropped layer's parameters get a zero gradient that step, at ZeRO 0-2 and any worker count alike (DeepSpeed's
  ZeRO-1/2 zero-fill a partition's missing gradients; `zero_missing_gradients` does the same at ZeRO-0), so its
  optimizer state steps as for any zero gradient. ZeRO-3 steps those partitions otherwise (its losses part from
  stages 0-2's), so `check_launchable` refuses it.
- Scaling: a kept layer's branch keeps its multiplier (no 1/(1-p) rescaling): a cut of depth L' keeps the parent's
  residual multiplier too (`cuts.py`), and at p = 0 training is today's, bit for bit.
"""

from __future__ import annotations

import torch

from rung.jobs.config import TrainConfig

SEED_STRIDE = 1_000_003  # steps of one run never collide with another seed's


def drop_rate(train: TrainConfig, step: int) -> float:
    """p at optimizer step `step` (0-based): linear over the warmup, then `train.layerdrop`."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.layerdrop * step / train.warmup_steps
    return train.layerdrop


def step_layers(train: TrainConfig, step: int, n_layers: int) -> list[int] | None:
    """The layers step `step` trains, in order; None when it trains them all (the forward as without LayerDrop)."""
    rate = drop_rate(train, step)
    if rate == 0:
        return None
    generator = torch.Generator().manual_seed(train.seed * SEED_STRIDE + step)
    kept = (torch.rand(n_layers, generator=generator) >= rate).nonzero().flatten().tolist()
    if not kept:
        kept = [int(torch.randint(n_layers, (1,), generator=generator))]
    return None if len(kept) == n_layers else kept


def zero_missing_gradients(model: torch.nn.Module, kept: list[int]) -> None:
    """A zero gradient for every parameter of the layers not in `kept` that has none (ZeRO-0 hands the optimizer
    the parameters' own gradients, where a missing one would skip the parameter rather than step it at zero)."""
    for index, layer in enumerate(model.layers):
        if index not in kept:
            for param in layer.parameters():
                if param.requires_grad and param.grad is None:
                    param.grad = torch.zeros_like(param)
