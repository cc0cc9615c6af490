"""A tensor-parallel worker (ranks 1..N-1): join the group, load this rank's shard and KV pool, then run every step
rank 0 writes to its step stream until the stream closes. Started by rank 0's `Workers` as a subprocess reading
stdin (`python -m rung.serving.worker.parallel.worker_process SETTINGS`) or inside a Ray actor (`ray_ranks.py`)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
from pathlib import Path
from typing import BinaryIO

import torch

from rung.config import from_dict
from rung.errors import ConfigError, RungError
from rung.platform.runtime import configure_process
from rung.serving.config import EngineConfig
from rung.serving.worker.parallel.group import TensorParallelGroup
from rung.serving.worker.parallel.shared_memory import SharedMemoryCollectives
from rung.serving.worker.parallel.sharding import Shard
from rung.serving.worker.parallel.launch import open_store
from rung.serving.worker.parallel.workers import StepMessage
from rung.serving.worker.runner import ModelRunner


def serve_shard(settings: dict, steps: BinaryIO) -> None:
    """A worker's life. `settings`: its rank, the world size, the store's description, the model folder and the
    engine config (as a dict) it computes under."""
    rank, world = settings["rank"], settings["world"]
    config = from_dict(EngineConfig, settings["config"])
    device = torch.device(config.device or "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = open_store(settings["store"], world)
    shared = None
    if settings.get("shared_memory"):  # mapped before joining: rank 0 unlinks the file once every rank has
        parent = os.getppid()
        shared = SharedMemoryCollectives(Path(settings["shared_memory"]["path"]), rank, world,
                                       settings["shared_memory"]["capacity"], lambda: os.getppid() == parent)
    store.set(f"joined/{rank}", "1")
    try:
        group = TensorParallelGroup(Shard(rank, world), device, store, shared)
        runner = ModelRunner.for_folder(settings["model_dir"], config, group=group)
    except RungError as err:  # rank 0 reports it as its own (a ConfigError keeps its field)
        field = err.field if isinstance(err, ConfigError) else None
        store.set(f"failed/{rank}", json.dumps({"field": field, "message": err.message if field else str(err)}))
        raise SystemExit(1) from None
    while True:
        try:
            message: StepMessage = pickle.load(steps)
        except EOFError:
            break
        runner.compute(message)
    group.leave()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group; rank 0 stops the workers
    configure_process()
    serve_shard(json.loads(sys.argv[1]), sys.stdin.buffer)


if __name__ == "__main__":
    main()
