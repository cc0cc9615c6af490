"""Single-process training on a DeepSpeed engine: data, model, parametrization groups, schedule, loop.

The Ray multi-worker launcher (rung.platform) reuses `build_engine` and `train_step`; this module knows nothing
about how many processes exist beyond the rank and world size it is given.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import yaml

from rung.config import to_dict
from rung.errors import ConfigError, RungError
from rung.jobs.build import build_model
from rung.jobs.config import RunConfig
from rung.jobs.counting import count
from rung.jobs.data.loader import SequenceLoader
from rung.jobs.data.shards import PreparedData, prepare
from rung.jobs.model import language_model_loss
from rung.jobs.progress import Progress
from rung.jobs.schedule import lr_factor
from rung.platform import runtime


class TrainingDiverged(RungError):
    """The loss or gradient became non-finite; the optimizer step was not taken."""


@dataclass(slots=True)
class StepMetrics:
    step: int
    loss: float  # cross-entropy, averaged over the step's micro-batches
    router_loss: float
    grad_norm: float
    lr: float  # the base (embedding-group) LR after the schedule
    tokens: int
    seconds: float


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    train = cfg.train
    per_step = train.micro_batch * world_size
    if train.global_batch % per_step:
        raise ConfigError("train.global_batch", f"{train.global_batch} is not a multiple of micro_batch × workers "
                          f"({train.micro_batch} × {world_size})")
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.global_batch // per_step,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's own optimizers JIT-compile on CPU
        "steps_per_print": 1 << 30,
    }


def build_engine(cfg: RunConfig, world_size: int = 1):
    """The DeepSpeed engine for `cfg`, with one AdamW group per parametrization role and a relative schedule."""
    import deepspeed

    if cfg.train.zero_stage == 3 and cfg.model.moe is not None:
        raise ConfigError("train.zero_stage", "ZeRO stage 3 cannot train MoE models (DeepSpeed does not support it)")
    model, param = build_model(cfg)
    groups = param.param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_eps)
    optimizer = torch.optim.AdamW(groups, betas=cfg.train.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg.train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size))
    return engine


def train_step(engine, loader: SequenceLoader, step: int, rank: int, world_size: int) -> StepMetrics:
    """One optimizer step: every micro-batch forward/backward, then DeepSpeed steps at the accumulation boundary."""
    started = time.perf_counter()
    inputs, targets = loader.batch(step, rank, world_size)
    micro = engine.train_micro_batch_size_per_gpu()
    ce_sum = router_sum = 0.0
    num_micro = inputs.shape[0] // micro
    for index in range(num_micro):
        rows = slice(index * micro, (index + 1) * micro)
        output = engine(inputs[rows].to(engine.device))
        loss, ce = language_model_loss(output, targets[rows].to(engine.device))
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss at step {step}: {loss.item()}")
        engine.backward(loss)
        engine.step()
        ce_sum += ce.item()
        router_sum += output.router_loss.item()
    grad_norm = engine.get_global_grad_norm()  # None where DeepSpeed did not compute one (ZeRO-0, no clipping)
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if math.isinf(grad_norm):
        raise TrainingDiverged(f"infinite gradient norm at step {step}")
    return StepMetrics(step=step, loss=ce_sum / num_micro, router_loss=router_sum / num_micro, grad_norm=grad_norm,
                       lr=engine.get_lr()[0], tokens=inputs.numel() * world_size, seconds=time.perf_counter() - started)


def prepare_data(cfg: RunConfig, log=print) -> PreparedData:
    """Tokenize (or reuse) the corpus and check its vocabulary fits the model."""
    data = prepare(cfg.data, log=log)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({data.vocab_size})")
    return data


def train(cfg: RunConfig, log=print) -> list[StepMetrics]:
    """Train on one process, logging loss, tokens/s and LR; writes config.yaml and metrics.jsonl to the run dir."""
    runtime.configure_process()
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.out_dir) / cfg.name
    data = prepare_data(cfg, log)
    loader = SequenceLoader(data, cfg.train.seq_len, cfg.train.global_batch, cfg.train.seed)
    runtime.init_single_process()
    engine = build_engine(cfg)
    size = count(cfg.model, cfg.train.seq_len)
    log(f"train: {cfg.name}: {size.total_params:,} params ({size.active_params:,} active), "
        f"{cfg.param.name}, {cfg.train.dtype}, ZeRO-{cfg.train.zero_stage}, {cfg.train.steps} steps "
        f"× {cfg.train.global_batch * cfg.train.seq_len:,} tokens")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    progress = Progress("step", cfg.train.steps, "tok", log)
    history, tokens = [], 0
    with (run_dir / "metrics.jsonl").open("w") as metrics_file:
        for step in range(cfg.train.steps):
            metrics = train_step(engine, loader, step, rank=0, world_size=1)
            history.append(metrics)
            tokens += metrics.tokens
            metrics_file.write(json.dumps(asdict(metrics)) + "\n")
            if (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps:
                log(progress.line(step + 1, tokens, f"loss {metrics.loss:.4f} lr {metrics.lr:.2e} "))
    return history
