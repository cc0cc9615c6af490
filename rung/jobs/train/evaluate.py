"""Validation loss: the held-out windows scored without gradients on every rank, reduced once.

Every rank runs the same number of forward passes (a shorter share is padded with weight-0 rows), because ZeRO-3's
parameter gathers and expert parallelism's all-to-alls are collectives that every rank must join. The figure is
cross-entropy per token over the whole set — sums and counts reduced in one all-reduce, so it is the same number
whatever the world size — the same quantity as the training loss, without the router losses.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rung.jobs.data.loader import ValidationSet
from rung.jobs.model.transformer import token_cross_entropy


def evaluate(engine, validation: ValidationSet, rank: int, world_size: int) -> float:
    """Mean validation cross-entropy per token, the same number on every rank."""
    totals = torch.zeros(2, dtype=torch.float64)  # summed cross-entropy, tokens
    was_training = engine.module.training
    engine.module.train(False)
    try:
        with torch.no_grad():
            for inputs, targets, weights in validation.rank_batches(rank, world_size,
                                                                     engine.train_micro_batch_size_per_gpu()):
                losses = token_cross_entropy(engine(inputs.to(engine.device)), targets.to(engine.device))
                totals[0] += (losses.double().sum(1).cpu() * weights).sum()
                totals[1] += weights.sum() * targets.shape[1]
    finally:
        engine.module.train(was_training)
    if world_size > 1:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # beyond ~709 exp overflows; a loss that high is divergence anyway
