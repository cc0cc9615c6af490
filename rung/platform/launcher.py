"""Run a function on a Ray Train worker group, each worker in a torch process group that rung forms itself.

Ray Train's TorchTrainer rendezvous listens on every interface; on one machine rung uses a file rendezvous instead
(on clusters, TCP at rank 0), announced to the other ranks with Ray Train's broadcast so a restarted group never
joins a stale one. Ray restarts the whole group on a worker failure, up to `max_failures` times; the worker
function is expected to resume from its own latest checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import rung.platform.cluster  # noqa: F401  (must configure Ray's environment before ray is imported)
from rung.errors import RungError
from rung.platform import runtime

WorkerFn = Callable[[Any, int, int], None]  # (payload, rank, world_size)


def _worker_entry(config: dict) -> None:
    import ray.train
    from ray.train.collective import broadcast_from_rank_zero

    if not config["single_machine"]:
        os.environ["RUNG_CLUSTER"] = "1"
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    runtime.configure_process()
    if rank == 0:
        rendezvous = (runtime.file_rendezvous(config["rendezvous_dir"]) if config["single_machine"]
                      else runtime.tcp_rendezvous())
    init_method = broadcast_from_rank_zero(rendezvous if rank == 0 else None)
    runtime.init_process_group(rank, world_size, context.get_local_rank(), init_method)
    config["fn"](config["payload"], rank, world_size)


def launch(fn: WorkerFn, payload: Any, *, workers: int, use_gpu: bool, storage: Path, single_machine: bool,
           max_failures: int) -> None:
    """Run `fn(payload, rank, world_size)` on `workers` Ray Train workers; returns when all have finished."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    storage.mkdir(parents=True, exist_ok=True)
    trainer = DataParallelTrainer(
        _worker_entry,
        train_loop_config={"fn": fn, "payload": payload, "single_machine": single_machine,
                           "rendezvous_dir": str(storage)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ray-train", storage_path=str(storage.resolve()),
                             failure_config=FailureConfig(max_failures=max_failures)),
    )
    try:
        trainer.fit()
    except Exception as err:  # Ray wraps worker errors; surface a user error's own message
        cause = _user_error(err)
        if cause is not None:
            raise cause from None
        raise RungError(f"the worker group failed: {err}") from None


def _user_error(err: BaseException) -> RungError | None:
    """The first RungError raised inside a worker, found through Ray's wrappers."""
    seen, stack = set(), [err]
    while stack:
        current = stack.pop()
        if id(current) in seen or current is None:
            continue
        seen.add(id(current))
        if isinstance(current, RungError):
            return current
        stack.extend([current.__cause__, current.__context__])
        stack.extend(getattr(current, "worker_failures", {}).values() if hasattr(current, "worker_failures") else [])
        stack.extend(e for e in getattr(current, "args", ()) if isinstance(e, BaseException))
    return None
