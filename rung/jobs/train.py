"""The training loop every worker runs: data, DeepSpeed engine, parametrization groups, checkpoints, metrics.

`run_worker` is the same function whether it runs in the `rung` process (one worker) or in Ray Train workers
(rung.platform.launcher); it only needs its rank, the world size and a process group.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from rung.config import to_dict
from rung.errors import ConfigError, RungError
from rung.jobs.build import build_model
from rung.jobs.checkpointing import load_checkpoint, save_checkpoint
from rung.jobs.config import RunConfig
from rung.jobs.counting import count
from rung.jobs.data.loader import SequenceLoader
from rung.jobs.data.shards import TOKENIZER_FILE, PreparedData, prepare
from rung.jobs.expert_parallel import mark_expert_parameters, setup_expert_parallel
from rung.jobs.model import language_model_loss
from rung.jobs.progress import Progress
from rung.jobs.schedule import lr_factor
from rung.jobs.train_metrics import TrainMetrics
from rung.platform import runtime
from rung.platform.checkpoint import MANIFEST, CheckpointStore, RemoteMirror


class TrainingDiverged(RungError):
    """The loss or gradient became non-finite; the optimizer step was not taken."""


@dataclass(slots=True)
class StepMetrics:
    step: int  # 1-based: optimizer steps completed
    loss: float  # cross-entropy of the whole global batch (averaged over workers and micro-batches)
    router_loss: float
    moe_dropped_fraction: float
    moe_load_imbalance: float  # busiest expert's load / mean load, averaged over MoE layers (1 = balanced)
    grad_norm: float
    lr: float  # the embedding group's LR after the schedule (= base LR × schedule factor)
    tokens: int  # tokens in this step across all workers
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


def check_launchable(cfg: RunConfig, world_size: int) -> None:
    """Reject what no worker group can run, before any worker starts."""
    if cfg.train.zero_stage == 3 and cfg.model.moe is not None:
        raise ConfigError("train.zero_stage", "ZeRO stage 3 cannot train MoE models (DeepSpeed does not support it)")
    deepspeed_config(cfg, world_size)


def build_engine(cfg: RunConfig, world_size: int = 1):
    """The DeepSpeed engine for `cfg`, with one AdamW group per parametrization role and a relative schedule."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    check_launchable(cfg, world_size)
    ep = cfg.train.expert_parallel
    placement = setup_expert_parallel(ep, cfg.model.moe.n_experts) if ep > 1 else None
    model, param = build_model(cfg, placement=placement)
    groups = param.param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_eps)
    if placement is not None:
        mark_expert_parameters(model, placement)
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    optimizer = torch.optim.AdamW(groups, betas=cfg.train.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg.train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size))
    if world_size == 1 and cfg.train.zero_stage == 0:
        # One worker has nothing to all-reduce, yet DeepSpeed would still flatten, "reduce" and copy back every
        # gradient each step (ZeRO 1-3 need that path to fill their partitions, ZeRO-0 does not).
        engine.enable_backward_allreduce = False
    return engine


def train_step(engine, loader: SequenceLoader, step: int, rank: int, world_size: int) -> StepMetrics:
    """Optimizer step `step` (0-based): every micro-batch forward/backward; DeepSpeed steps at the boundary."""
    started = time.perf_counter()
    inputs, targets = loader.batch(step, rank, world_size)
    micro = engine.train_micro_batch_size_per_gpu()
    num_micro = inputs.shape[0] // micro
    sums = torch.zeros(4, dtype=torch.float64)  # cross-entropy, router loss, dropped share, load imbalance
    for index in range(num_micro):
        rows = slice(index * micro, (index + 1) * micro)
        output = engine(inputs[rows].to(engine.device))
        loss, ce = language_model_loss(output, targets[rows].to(engine.device))
        if not torch.isfinite(loss):  # before backward: a non-finite loss never reaches the optimizer
            raise TrainingDiverged(f"non-finite loss at step {step + 1}: {loss.item()}")
        engine.backward(loss)
        engine.step()
        with torch.no_grad():
            sums[0] += ce.detach().double().cpu()
            sums[1] += output.router_loss.detach().double().cpu()
            if output.router_stats:
                sums[2] += torch.stack([s.dropped_fraction for s in output.router_stats]).double().mean().cpu()
                sums[3] += torch.stack([s.expert_load.max() * s.expert_load.numel()
                                        for s in output.router_stats]).double().mean().cpu()
    # Report the global batch's figures, not this rank's share: one small all-reduce per step.
    if world_size > 1:
        dist.all_reduce(sums)
    ce, router, dropped, imbalance = (sums / (num_micro * world_size)).tolist()
    grad_norm = engine.get_global_grad_norm()  # None where DeepSpeed did not compute one (ZeRO-0 fp32)
    grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
    if math.isinf(grad_norm):
        raise TrainingDiverged(f"infinite gradient norm at step {step + 1}")
    return StepMetrics(step=step + 1, loss=ce, router_loss=router, moe_dropped_fraction=dropped,
                       moe_load_imbalance=imbalance or 1.0,
                       grad_norm=grad_norm, lr=engine.get_lr()[0], tokens=inputs.numel() * world_size,
                       seconds=time.perf_counter() - started)


def prepare_data(cfg: RunConfig, log=print) -> PreparedData:
    """Tokenize (or reuse) the corpus and check its vocabulary fits the model."""
    data = prepare(cfg.data, log=log)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({data.vocab_size})")
    return data


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.out_dir) / cfg.name


def _resume_point(store: CheckpointStore, mirror: RemoteMirror | None, rank: int) -> Path | None:
    """Rank 0 picks the newest verified checkpoint, local or mirrored (hashing once), and tells the others its
    step; a rank whose machine lacks that checkpoint fetches it from the mirror."""
    chosen = torch.tensor([-1])
    if rank == 0:
        local = store.latest()
        remote = mirror.latest() if mirror is not None else None
        chosen[0] = max(local[0] if local else -1, remote if remote is not None else -1)
    dist.broadcast(chosen, src=0)
    step = int(chosen.item())
    if step < 0:
        return None
    path = store.root / store.name(step)
    if not (path / MANIFEST).is_file() and mirror is not None:
        mirror.download(step, store.root)
    return path


def run_worker(cfg: RunConfig, rank: int, world_size: int, resume: bool, log=print) -> list[StepMetrics]:
    """Train (or continue) the run on this worker; the process group must exist. Returns this worker's steps."""
    run_dir = run_dir_of(cfg)
    say = log if rank == 0 else (lambda _line: None)
    data = prepare_data(cfg, say)
    loader = SequenceLoader(data, cfg.train.seq_len, cfg.train.global_batch, cfg.train.seed)
    engine = build_engine(cfg, world_size)
    store = CheckpointStore(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    mirror = RemoteMirror(cfg.train.checkpoint_uri, cfg.train.keep_checkpoints) if cfg.train.checkpoint_uri else None
    start, tokens = 0, 0
    if resume and (path := _resume_point(store, mirror, rank)) is not None:
        start, tokens = load_checkpoint(engine, path, cfg)
        say(f"train: resumed from {path} at step {start}")
    if rank == 0:
        _keep_metrics_until(run_dir, start)
    metrics = TrainMetrics(rank)
    if cfg.train.metrics_port is not None:
        # + the local rank: every node's first worker on the same port, so a PodMonitor can name it
        metrics.serve(cfg.train.metrics_port + int(os.environ.get("LOCAL_RANK", rank)), runtime.listen_host())
    size = count(cfg.model, cfg.train.seq_len)
    peak = cfg.train.peak_flops or runtime.peak_flops(cfg.train.dtype)
    say(f"train: {cfg.name}: {size.total_params:,} params ({size.active_params:,} active), {cfg.param.name}, "
        f"{cfg.train.dtype}, ZeRO-{cfg.train.zero_stage}, {world_size} worker(s), steps {start}->{cfg.train.steps} "
        f"× {cfg.train.global_batch * cfg.train.seq_len:,} tokens")
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        shutil.copyfile(data.path / TOKENIZER_FILE, run_dir / TOKENIZER_FILE)  # export ships it with the model
    (run_dir / "workers").mkdir(parents=True, exist_ok=True)
    placement = engine.module.expert_placement
    worker = {"pid": os.getpid(), "experts": list(placement.local_ids) if placement else None}
    (run_dir / "workers" / f"rank{rank}.json").write_text(json.dumps(worker))  # who runs where, for operators
    progress = Progress("step", cfg.train.steps, "tok", start=start)
    trained = 0
    history: list[StepMetrics] = []
    every = cfg.train.checkpoint_every
    with (run_dir / "metrics.jsonl").open("a") if rank == 0 else open(os.devnull, "w") as jsonl:
        for step in range(start, cfg.train.steps):
            row = train_step(engine, loader, step, rank, world_size)
            history.append(row)
            tokens += row.tokens
            trained += row.tokens
            mfu = size.flops_per_token * row.tokens / world_size / row.seconds / peak
            metrics.record(row, world_size, mfu)
            jsonl.write(json.dumps(asdict(row)) + "\n")
            jsonl.flush()
            if row.step % cfg.train.log_every == 0 or row.step == cfg.train.steps:
                say(progress.line(row.step, trained, f"loss {row.loss:.4f} lr {row.lr:.2e} mfu {mfu:.1%} "))
            limit = cfg.train.max_loss
            if limit is not None and row.step > cfg.train.warmup_steps and row.loss > limit:
                raise TrainingDiverged(f"loss {row.loss:.3f} above train.max_loss ({limit:g}) at step {row.step}")
            if cfg.train.keep_checkpoints and ((every and row.step % every == 0) or row.step == cfg.train.steps):
                saved_at = time.perf_counter()
                path = save_checkpoint(engine, store, cfg, row.step, tokens, mirror)
                metrics.checkpoint_seconds.set(time.perf_counter() - saved_at)
                metrics.checkpoint_time.set_to_current_time()
                if path is not None:
                    say(f"train: checkpoint {path} ({time.perf_counter() - saved_at:.2f} s)")
    return history


def read_metrics(run_dir: Path) -> list[dict]:
    """The run's per-step rows (the last write of each step wins, as after a restart)."""
    path = run_dir / "metrics.jsonl"
    rows = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


def _keep_metrics_until(run_dir: Path, step: int) -> None:
    """After a resume at `step`, drop the rows a failed attempt wrote past it, so each step appears once."""
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        kept = [json.dumps(row) for row in read_metrics(run_dir) if row["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def _check_storage(cfg: RunConfig, run_dir: Path, resume: bool) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RungError(f"the run directory {run_dir} is not writable: {err.strerror or err}") from None
    mirror = RemoteMirror(cfg.train.checkpoint_uri) if cfg.train.checkpoint_uri else None
    if mirror is not None:
        mirror.check_writable()
    if not resume and (CheckpointStore(run_dir / "checkpoints").committed() or (mirror and mirror.committed())):
        raise ConfigError("name", f"{run_dir} (or train.checkpoint_uri) already holds checkpoints of an earlier "
                          "run: pass --resume to continue it, or choose another name / out_dir")


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Paths resolved against this process's directory: Ray workers run elsewhere."""
    cfg = copy.deepcopy(cfg)
    cfg.out_dir = os.path.abspath(cfg.out_dir)
    cfg.data.cache_dir = os.path.abspath(cfg.data.cache_dir)
    cfg.data.sources = [os.path.abspath(source) for source in cfg.data.sources]
    if cfg.data.tokenizer is not None:
        cfg.data.tokenizer = os.path.abspath(cfg.data.tokenizer)
    return cfg


def _ray_worker(payload: dict, rank: int, world_size: int) -> None:
    from rung.config import from_dict

    # Always resume: a first launch was checked to have no checkpoints, a restart must continue from its last.
    run_worker(from_dict(RunConfig, payload), rank, world_size, resume=True)


def train_here(cfg: RunConfig, resume: bool = False, log=print) -> list[dict]:
    """One worker in this very process (also inside a Ray task, as sweeps run): no worker group."""
    runtime.init_process_group(rank=0, world_size=1, local_rank=0, init_method=runtime.file_rendezvous())
    run_worker(cfg, rank=0, world_size=1, resume=resume, log=log)
    return read_metrics(run_dir_of(cfg))


def train(cfg: RunConfig, resume: bool = False, address: str | None = None, log=print,
          transfer: dict | None = None) -> list[dict]:
    """Train `cfg` on `train.workers` workers and return the run's per-step metric rows.

    One worker and no cluster address: in this process, no Ray needed. Otherwise a Ray Train worker group on the
    embedded local cluster or the cluster at `address` / RAY_ADDRESS, restarted from the last checkpoint on
    failure up to `train.max_failures` times. `transfer`: the provenance of transferred hyperparameters."""
    runtime.configure_process()
    torch.manual_seed(cfg.train.seed)
    check_launchable(cfg, cfg.train.workers)
    cfg = with_absolute_paths(cfg)
    run_dir = run_dir_of(cfg)
    _check_storage(cfg, run_dir, resume)
    if transfer is not None:  # provenance, for the run directory and the exported model card
        (run_dir / "transfer.json").write_text(json.dumps(transfer, indent=2))
    prepare_data(cfg, log)  # here, once: bad corpora fail before any worker starts, and workers find the cache
    if cfg.train.workers == 1 and address is None and not os.environ.get("RAY_ADDRESS"):
        return train_here(cfg, resume, log)
    from rung.platform import cluster, launcher

    handle = cluster.connect(address)
    cluster.check_capacity(handle, cfg.train.workers, cfg.train.use_gpu)
    log(f"train: launching {cfg.train.workers} workers on "
        f"{'an embedded local Ray' if handle.embedded else handle.address} ({handle.cpus:g} CPUs, {handle.gpus:g} GPUs)")
    launcher.launch(_ray_worker, to_dict(cfg), workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                    storage=run_dir / "ray", single_machine=handle.embedded, max_failures=cfg.train.max_failures)
    return read_metrics(run_dir)
