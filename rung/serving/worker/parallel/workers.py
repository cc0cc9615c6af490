"""Ranks 1..N-1 of a tensor-parallel engine, each a process of its own.

Rank 0 is the engine core (it keeps the scheduler, the KV manager and the sampler, as vLLM's engine core does) and
computes its own shard too. It starts the other ranks as `python -m rung.serving.worker.parallel.worker_process` (plain
subprocesses: the engine process is a daemon, and daemons may not fork multiprocessing children), and every step
writes the step's inputs to each worker's stdin; the workers run the same forward over their shards, meeting rank 0
in the collectives, and return nothing but their share of those. A worker whose stdin closes (rank 0 gone) exits.

Joining goes through a file store in a fresh temporary folder (these ranks share one machine, and a file holds no
port another service could want): each worker says it joined, or why it could not load, and rank 0 waits for that
while watching the processes, so a worker that dies while starting is reported, not waited for.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from rung.errors import ConfigError, RungError
from rung.serving.config import EngineConfig
from rung.serving.worker.model_spec import load_spec, read_config
from rung.serving.worker.parallel.group import TensorParallelGroup
from rung.serving.worker.parallel.sharding import Shard, check_tensor_parallel
from rung.serving.worker.step import StepInputs

JOIN_TIMEOUT_SECONDS = 300.0  # how long rank 0 waits for the workers to start (imports, CUDA contexts)


@dataclass
class StepMessage:
    """What a worker needs to run one step's forward as rank 0 does: the packed inputs, the nano-batch count, and
    the rows whose logits rank 0 samples (the workers take part in their gather)."""

    token_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    spans: list[tuple[int, int, list[slice]]]
    read_in_place: bool
    nano_batches: int
    sample_rows: list[int]

    @classmethod
    def of(cls, inputs: StepInputs, nano_batches: int, sample_rows: list[int]) -> StepMessage:
        cpu = torch.device("cpu")
        return cls(inputs.token_ids.to(cpu), inputs.positions.to(cpu), inputs.slots.to(cpu), inputs.spans,
                   inputs.read_in_place, nano_batches, sample_rows)

    def inputs(self, device: torch.device) -> StepInputs:
        return StepInputs(self.token_ids, self.positions, self.slots, self.spans, self.read_in_place).to(device)


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """The config a rank computes under: on GPUs, rank r on device r."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return replace(config, device=f"cuda:{rank}") if device.startswith("cuda") else config


class Workers:
    """Rank 0's side: the worker processes and the process group they joined. Building it checks the request
    (`check_tensor_parallel`), starts the workers, and returns once every rank has joined."""

    def __init__(self, model_dir: str | Path, config: EngineConfig):
        world = config.tensor_parallel_size
        spec = load_spec(model_dir)
        device = torch.device(rank_config(config, 0).device or "cpu")
        check_tensor_parallel(spec, world, device)
        if "quantization_config" in read_config(Path(model_dir) / "config.json"):
            raise ConfigError("tensor_parallel_size", f"{model_dir} is a quantized folder, which rung's engine "
                              "serves on one device only (serve the float folder with --quantization instead)")
        self.weight_bytes: tuple[int, ...] = ()  # each rank's weights as it holds them, measured once all loaded
        self._rendezvous = tempfile.TemporaryDirectory(prefix="rung-tp-")
        self.store_path = str(Path(self._rendezvous.name) / "store")
        self._store = store = dist.FileStore(self.store_path, world)
        settings = asdict(config)
        self.processes = [subprocess.Popen(
            [sys.executable, "-m", "rung.serving.worker.parallel.worker_process",
             json.dumps({"rank": rank, "world": world, "store": self.store_path, "model_dir": str(model_dir),
                         "config": settings})], stdin=subprocess.PIPE) for rank in range(1, world)]
        try:
            self._wait_for_joins(store, world)
            self.group = TensorParallelGroup(Shard(0, world), device, store)
        except BaseException:
            self.stop()
            raise

    def _wait_for_joins(self, store: dist.Store, world: int) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
        waiting = set(range(1, world))
        while waiting:
            waiting -= {rank for rank in waiting if store.check([f"joined/{rank}"])}
            self.check()
            if time.monotonic() > deadline:
                raise RungError(f"tensor-parallel workers {sorted(waiting)} did not start within "
                                f"{JOIN_TIMEOUT_SECONDS:g} s")
            time.sleep(0.05)

    def send(self, message: StepMessage | None) -> None:
        """The next step to every worker (None: stop)."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for process in self.processes:
            try:
                process.stdin.write(payload)
                process.stdin.flush()
            except (BrokenPipeError, OSError):
                self.check()
                raise RungError("a tensor-parallel worker stopped reading its steps") from None

    def check(self) -> None:
        """Raise RungError if a worker has exited (an engine with a dead rank cannot compute a step), with the
        reason it left when it could not load."""
        for rank, process in enumerate(self.processes, 1):
            if process.poll() is not None:
                if self._store.check([f"failed/{rank}"]):
                    failure = json.loads(self._store.get(f"failed/{rank}"))
                    raise ConfigError(failure["field"], failure["message"]) if failure["field"] else \
                        RungError(failure["message"])
                raise RungError(f"tensor-parallel worker {rank} exited (code {process.returncode})")

    def stop(self) -> None:
        """Tell every worker to stop, and end those that do not within a few seconds."""
        for process in self.processes:
            try:
                process.stdin.close()  # end of steps: the worker exits
            except OSError:
                pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if hasattr(self, "group"):
            self.group.leave()
        self._rendezvous.cleanup()
