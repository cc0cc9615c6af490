"""The training loop every worker runs, and how a run is launched: in this process or as a Ray Train worker group.

`run_worker` is the same function whether it runs in the `rung` process (one worker) or in Ray Train workers
(rung.platform.launcher); it only needs its rank, the world size and a process group. It wires the components —
data loader, DeepSpeed engine (`deepspeed_engine.py`), checkpointer, divergence guard, metrics logger — and runs
`train_step` (`step.py`) until the last step.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
import yaml

from rung.config import from_dict, to_dict
from rung.errors import ConfigError, RungError
from rung.jobs.config import RunConfig, with_absolute_paths
from rung.jobs.data.loader import SequenceLoader, ValidationSet
from rung.jobs.data.prepare import prepare_data
from rung.jobs.model.counting import count
from rung.jobs.run_dir import RunDir
from rung.jobs.train.attention_kernel import attention_kernel
from rung.jobs.train.checkpointer import Checkpointer
from rung.jobs.train.deepspeed_engine import build_engine, check_launchable, rung_clips
from rung.jobs.train.evaluate import evaluate, perplexity
from rung.jobs.train.guard import DivergenceGuard
from rung.jobs.train.metrics import MetricsLogger, keep_metrics_until, read_metrics
from rung.jobs.train.step import StepMetrics, train_step
from rung.platform import runtime
from rung.platform.checkpoint import CheckpointStore, RemoteMirror


def run_worker(cfg: RunConfig, rank: int, world_size: int, resume: bool, log=print) -> list[StepMetrics]:
    """Train (or continue) the run on this worker; the process group must exist. Returns this worker's steps."""
    run_dir = RunDir.of(cfg)
    say = log if rank == 0 else (lambda _line: None)
    data = prepare_data(cfg, say)
    loader = SequenceLoader(data, cfg.train.seq_len, cfg.train.global_batch, cfg.train.seed)
    validation = ValidationSet(data, cfg.train.seq_len, cfg.train.global_batch, cfg.train.eval_batches,
                               cfg.train.seed) if data.validation else None
    engine = build_engine(cfg, world_size)
    checkpointer = Checkpointer(run_dir, cfg)
    start, tokens = 0, 0
    if resume and (path := checkpointer.resume_point(rank)) is not None:
        start, tokens = checkpointer.load(engine, path)
        say(f"train: resumed from {path} at step {start}")
    if rank == 0:
        keep_metrics_until(run_dir, start)
        run_dir.root.mkdir(parents=True, exist_ok=True)
        run_dir.config.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        shutil.copyfile(data.tokenizer_path, run_dir.tokenizer)  # export ships it with the model
    placement = engine.module.expert_placement
    run_dir.worker(rank).parent.mkdir(parents=True, exist_ok=True)
    run_dir.worker(rank).write_text(json.dumps({"pid": os.getpid(),  # who runs where, for operators
                                                "experts": list(placement.local_ids) if placement else None}))
    guard = DivergenceGuard(cfg.train, computes_norm=rung_clips(cfg))
    metrics = MetricsLogger(run_dir, cfg, rank, world_size, start, say)
    size = count(cfg.model, cfg.train.seq_len)
    kernel = attention_kernel(cfg, engine.device)
    say(f"train: {cfg.name}: {size.total_params:,} params ({size.active_params:,} active), {cfg.param.name}, "
        f"{cfg.train.dtype}, ZeRO-{cfg.train.zero_stage}, {world_size} worker(s), steps {start}->{cfg.train.steps} "
        f"× {cfg.train.global_batch * cfg.train.seq_len:,} tokens, attention kernel {kernel.name.lower()}")
    history: list[StepMetrics] = []
    try:
        for step in range(start, cfg.train.steps):
            row = train_step(engine, loader, step, rank, world_size, guard, cfg.train)
            if validation is not None and evaluation_due(cfg, row.step):
                row.val_loss = evaluate(engine, validation, rank, world_size)
                row.val_perplexity = perplexity(row.val_loss)
            history.append(row)
            tokens += row.tokens
            metrics.record(row)
            guard.check_loss_limit(row.step, row.loss)
            if checkpointer.due(row.step):
                metrics.checkpoint(*checkpointer.save(engine, row.step, tokens))
    finally:
        metrics.close()
    return history


def evaluation_due(cfg: RunConfig, step: int) -> bool:
    """Every `train.eval_every` steps and at the last: a function of the step alone, so a resumed run keeps the
    schedule."""
    every = cfg.train.eval_every
    return step == cfg.train.steps or every > 0 and step % every == 0


def _check_storage(cfg: RunConfig, run_dir: RunDir, resume: bool, restart: bool) -> None:
    """The run directory is writable, and what it holds fits the request: no checkpoints unless resuming or
    restarting, and a resume that has a verified checkpoint to continue from unless restarting."""
    try:
        run_dir.root.mkdir(parents=True, exist_ok=True)
        probe = run_dir.root / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RungError(f"the run directory {run_dir.root} is not writable: {err.strerror or err}") from None
    mirror = RemoteMirror(cfg.train.checkpoint_uri) if cfg.train.checkpoint_uri else None
    if mirror is not None:
        mirror.check_writable()
    store = CheckpointStore(run_dir.checkpoints)
    existing = len(store.committed()) + (len(mirror.committed()) if mirror else 0)
    if not existing:
        return
    if restart:
        if mirror is not None and mirror.committed():
            raise ConfigError("train.checkpoint_uri", "--restart cannot clear the checkpoints at the mirror; "
                              "remove them there, or choose another name / out_dir")
        for _step, path in store.committed():  # replaced, so that a later --resume cannot pick an old one
            shutil.rmtree(path)
        return
    if not resume:
        raise ConfigError("name", f"{run_dir.root} (or train.checkpoint_uri) already holds checkpoints of an earlier "
                          "run: pass --resume to continue it, --restart to start it again, or choose another name / "
                          "out_dir")
    if store.latest() is None and (mirror is None or mirror.latest() is None):
        raise RungError(f"none of the {existing} checkpoints of {run_dir.root} verifies (damaged or incomplete); "
                        "nothing was changed. Pass --restart to train again from step 0, replacing them")


def _discard_if_unstarted(run_dir: RunDir) -> None:
    """A run that failed before its first step leaves no directory behind (only a fresh one is removed)."""
    if run_dir.root.is_dir() and not run_dir.metrics.exists() and not CheckpointStore(run_dir.checkpoints).committed():
        shutil.rmtree(run_dir.root, ignore_errors=True)


def _ray_worker(payload: dict, rank: int, world_size: int) -> None:
    # Always resume: a first launch was checked to have no checkpoints, a restart must continue from its last.
    run_worker(from_dict(RunConfig, payload), rank, world_size, resume=True)


def train_here(cfg: RunConfig, resume: bool = False, log=print) -> list[dict]:
    """One worker in this very process (also inside a Ray task, as sweeps run): no worker group."""
    runtime.init_process_group(rank=0, world_size=1, local_rank=0, init_method=runtime.file_rendezvous())
    run_worker(cfg, rank=0, world_size=1, resume=resume, log=log)
    return read_metrics(RunDir.of(cfg))


def train(cfg: RunConfig, resume: bool = False, address: str | None = None, log=print,
          transfer: dict | None = None, restart: bool = False) -> list[dict]:
    """Train `cfg` on `train.workers` workers and return the run's per-step metric rows.

    One worker and no cluster address: in this process, no Ray needed. Otherwise a Ray Train worker group on the
    embedded local cluster or the cluster at `address` / RAY_ADDRESS, restarted from the last checkpoint on
    failure up to `train.max_failures` times. `transfer`: the provenance of transferred hyperparameters.
    `restart`: start at step 0 even where the run directory holds checkpoints (they are replaced).
    A run that fails before its first step leaves no run directory behind."""
    runtime.configure_process()
    torch.manual_seed(cfg.train.seed)
    check_launchable(cfg, cfg.train.workers)
    cfg = with_absolute_paths(cfg)
    run_dir = RunDir.of(cfg)
    fresh = not run_dir.root.exists()
    _check_storage(cfg, run_dir, resume, restart)
    try:
        return _run(cfg, run_dir, resume and not restart, address, log, transfer)
    except BaseException:
        if fresh:
            _discard_if_unstarted(run_dir)
        raise


def _run(cfg: RunConfig, run_dir: RunDir, resume: bool, address: str | None, log, transfer: dict | None
         ) -> list[dict]:
    if transfer is not None:  # provenance, for the run directory and the exported model card
        run_dir.transfer.write_text(json.dumps(transfer, indent=2))
    prepare_data(cfg, log)  # here, once: bad corpora fail before any worker starts, and workers find the cache
    if cfg.train.workers == 1 and address is None and not os.environ.get("RAY_ADDRESS"):
        return train_here(cfg, resume, log)
    from rung.platform import cluster, launcher

    handle = cluster.connect(address)
    cluster.check_capacity(handle, cfg.train.workers, cfg.train.use_gpu)
    log(f"train: launching {cfg.train.workers} workers on "
        f"{'an embedded local Ray' if handle.embedded else handle.address} ({handle.cpus:g} CPUs, {handle.gpus:g} GPUs)")
    launcher.launch(_ray_worker, to_dict(cfg), workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                    storage=run_dir.ray_storage, single_machine=handle.embedded, max_failures=cfg.train.max_failures)
    return read_metrics(run_dir)
