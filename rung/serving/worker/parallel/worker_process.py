"""A tensor-parallel worker process (ranks 1..N-1, started by rank 0's `Workers`): join the group, load this rank's
shard and KV pool, then run every step rank 0 writes to stdin until it closes."""

from __future__ import annotations

import json
import pickle
import signal
import sys

import torch
import torch.distributed as dist

from rung.config import from_dict
from rung.errors import ConfigError, RungError
from rung.platform.runtime import configure_process
from rung.serving.config import EngineConfig
from rung.serving.worker.parallel.group import TensorParallelGroup
from rung.serving.worker.parallel.sharding import Shard
from rung.serving.worker.parallel.workers import StepMessage, rank_config
from rung.serving.worker.runner import ModelRunner


def serve_shard(rank: int, world: int, store_path: str, model_dir: str, config: EngineConfig) -> None:
    """A worker's life: join the group, load its shard and KV pool, then run each step rank 0 sends until its
    stdin closes."""
    config = rank_config(config, rank)
    device = torch.device(config.device or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(store_path, world)
    store.set(f"joined/{rank}", "1")
    try:
        group = TensorParallelGroup(Shard(rank, world), device, store)
        runner = ModelRunner.for_folder(model_dir, config, group=group)
    except RungError as err:  # rank 0 reports it as its own (a ConfigError keeps its field)
        field = err.field if isinstance(err, ConfigError) else None
        store.set(f"failed/{rank}", json.dumps({"field": field, "message": err.message if field else str(err)}))
        raise SystemExit(1) from None
    stdin = sys.stdin.buffer
    while True:
        try:
            message: StepMessage | None = pickle.load(stdin)
        except EOFError:
            break
        if message is None:
            break
        runner.compute(message)
    group.leave()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; rank 0 stops the workers
    configure_process()
    settings = json.loads(sys.argv[1])
    serve_shard(settings["rank"], settings["world"], settings["store"], settings["model_dir"],
                from_dict(EngineConfig, settings["config"]))


if __name__ == "__main__":
    main()
