"""One optimizer step of a worker: every micro-batch's forward and backward, the divergence guard at the boundary,
DeepSpeed's update, and the step's figures for the whole global batch."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from rung.jobs.config import TrainConfig
from rung.jobs.data.loader import SequenceLoader
from rung.jobs.model.transformer import language_model_loss
from rung.jobs.train.guard import DivergenceGuard
from rung.jobs.train.layerdrop import step_layers, zero_missing_gradients


@dataclass(slots=True)
class StepMetrics:
    step: int  # 1-based: optimizer steps completed
    loss: float  # cross-entropy of the whole global batch (averaged over workers and micro-batches)
    router_loss: float
    moe_dropped_fraction: float
    moe_load_imbalance: float  # busiest expert's load / mean load, averaged over MoE layers (1 = balanced)
    grad_norm: float  # global, before clipping
    lr: float  # the embedding group's LR after the schedule (= base LR × schedule factor)
    tokens: int  # tokens in this step across all workers
    seconds: float
    data_seconds: float = 0.0  # of `seconds`, spent building the step's batch
    peak_memory_bytes: int = 0  # this worker's peak so far: CUDA allocations on a GPU, resident set on a CPU
    group_lrs: dict[str, float] = field(default_factory=dict)  # every parametrization group's LR after the schedule
    # Cross-entropy on the held-out validation set, at steps that evaluate (train.eval_every, the last); else None
    val_loss: float | None = None
    val_perplexity: float | None = None


def group_lrs(optimizer) -> dict[str, float]:
    """Each named AdamW group's current LR (the first group of a name, when expert parallelism splits one)."""
    lrs: dict[str, float] = {}
    for index, group in enumerate(optimizer.param_groups):
        lrs.setdefault(str(group.get("name", index)), float(group["lr"]))
    return lrs


def peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_high_water()


def resident_high_water() -> int:
    """This process's peak resident set: Linux's VmHWM, the high-water mark of its own address space. Not
    ru_maxrss: Linux carries the old address space's mark across exec, so a run started by a large process (a
    notebook, a test runner — Python starts children by vfork and exec) would report its parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # elsewhere: KiB on Linux, the best there is


def train_step(engine, loader: SequenceLoader, step: int, rank: int, world_size: int,
               guard: DivergenceGuard, train: TrainConfig) -> StepMetrics:
    """Optimizer step `step` (0-based): every micro-batch forward/backward through the layers LayerDrop keeps this
    step (`layerdrop.py`); DeepSpeed steps at the boundary."""
    started = time.perf_counter()
    inputs, targets = loader.batch(step, rank, world_size)
    data_seconds = time.perf_counter() - started
    micro = engine.train_micro_batch_size_per_gpu()
    num_micro = inputs.shape[0] // micro
    sums = torch.zeros(4, dtype=torch.float64)  # cross-entropy, router loss, dropped share, load imbalance
    norm = None
    layers = step_layers(train, step, len(engine.module.layers))
    for index in range(num_micro):
        rows = slice(index * micro, (index + 1) * micro)
        output = engine(inputs[rows].to(engine.device), layers=layers)
        loss, ce = language_model_loss(output, targets[rows].to(engine.device))
        guard.check_loss(loss, step)
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            if layers is not None and engine.zero_optimization_stage() == 0:  # ZeRO 1-3 zero-fill partitions
                zero_missing_gradients(engine.module, layers)
            norm = guard.before_update(engine, step)
        engine.step()
        with torch.no_grad():
            sums[0] += ce.detach().double().cpu()
            sums[1] += output.router_loss.detach().double().cpu()
            if output.router_stats:
                sums[2] += torch.stack([s.dropped_fraction for s in output.router_stats]).double().mean().cpu()
                sums[3] += torch.stack([s.expert_load.max() * s.expert_load.numel()
                                        for s in output.router_stats]).double().mean().cpu()
    norm = guard.after_update(engine, step, norm)
    # Report the global batch's figures, not this rank's share: one small all-reduce per step.
    if world_size > 1:
        dist.all_reduce(sums)
    ce, router, dropped, imbalance = (sums / (num_micro * world_size)).tolist()
    return StepMetrics(step=step + 1, loss=ce, router_loss=router, moe_dropped_fraction=dropped,
                       moe_load_imbalance=imbalance or 1.0, grad_norm=norm, lr=engine.get_lr()[0],
                       tokens=inputs.numel() * world_size, seconds=time.perf_counter() - started,
                       data_seconds=data_seconds, peak_memory_bytes=peak_memory(engine.device),
                       group_lrs=group_lrs(engine.lr_scheduler.optimizer))
