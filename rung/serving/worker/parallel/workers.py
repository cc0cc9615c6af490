"""Ranks 1..N-1 of a tensor-parallel engine, each a process of its own, as rank 0 sees them.

Rank 0 is the engine core (it keeps the scheduler, the KV manager and the sampler, as vLLM's engine core does) and
computes its own shard too. It starts the other ranks, and every step writes the step's inputs to each worker's
step stream; the workers run the same forward over their shards, meeting rank 0 in the collectives, and return
nothing but their share of those. A worker whose step stream closes (rank 0 gone) exits.

Two ways to start them (`distributed_backend`):
- mp (the default, `launch.LocalLauncher`): `python -m rung.serving.worker.parallel.worker_process` on this machine
  (plain subprocesses: the engine process is a daemon, and daemons may not fork multiprocessing children), each
  reading its steps from stdin, joined through a file store in a fresh temporary folder (a file holds no port
  another service could want);
- ray: Ray actors placed by a placement group, one bundle each, on whichever nodes hold the resources
  (`ray_ranks.RayLauncher`), reading their steps from a TCP connection to rank 0 and joined through a TCP store
  rank 0 hosts.

CPU ranks on this machine also map one shared-memory region for their all-reduces (`shared_memory.py`), which rank
0 creates before they start and unlinks once they have joined. Either way each worker says in the store that it
joined, or why it could not load, and rank 0 waits for that while
watching the workers, so one that dies while starting is reported, not waited for.
"""

from __future__ import annotations

import json
import os
import pickle
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from rung.errors import ConfigError, RungError
from rung.serving.config import EngineConfig
from rung.serving.worker.model_spec import load_spec, read_config
from rung.serving.worker.parallel.group import TensorParallelGroup
from rung.serving.worker.parallel.launch import Launcher, Rank
from rung.serving.worker.parallel.shared_memory import SharedMemoryCollectives, create_region, region_bytes
from rung.serving.worker.parallel.sharding import Shard, check_tensor_parallel
from rung.serving.worker.step import StepInputs

JOIN_TIMEOUT_SECONDS = 300.0  # how long rank 0 waits for the workers to start (imports, CUDA contexts, placement)


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
    """The config a rank on this machine computes under: on GPUs, rank r on device r."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return replace(config, device=f"cuda:{rank}") if device.startswith("cuda") else config


def _region_path(size: int) -> Path | None:
    """A fresh name in /dev/shm for a shared-memory region of `size` bytes; None where there is no /dev/shm or it
    lacks the room (a container's default 64 MiB may): a write past it would kill the process, so gloo sums
    instead."""
    shm = Path("/dev/shm")
    if not os.access(shm, os.W_OK):
        return None
    stats = os.statvfs(shm)
    return shm / f"rung-tp-{uuid.uuid4().hex}" if stats.f_bavail * stats.f_frsize >= size else None


class Workers:
    """Rank 0's side: the workers and the process group they joined. Building it checks the request
    (`check_tensor_parallel`), starts the workers, and returns once every rank has joined."""

    def __init__(self, model_dir: str | Path, config: EngineConfig, launch: Callable[[int, torch.device], Launcher]):
        """`launch(world, device)`: how the workers start (`LocalLauncher`, or `ray_ranks.RayLauncher`, which
        `engine.py` picks, so that this module, which the runner imports, never reaches Ray's)."""
        world = config.tensor_parallel_size
        spec = load_spec(model_dir)
        device = torch.device(rank_config(config, 0).device or "cpu")
        if "quantization_config" in read_config(Path(model_dir) / "config.json"):
            raise ConfigError("tensor_parallel_size", f"{model_dir} is a quantized folder, which rung's engine "
                              "serves on one device only (serve the float folder with --quantization instead)")
        self.weight_bytes: tuple[int, ...] = ()  # each rank's weights as it holds them, measured once all loaded
        self.ranks: list[Rank] = []
        local = config.distributed_backend == "mp"
        check_tensor_parallel(spec, world, device, local=local)
        self._launcher = launch(world, device)
        # CPU ranks on this machine sum through shared memory: as large as a step's activations
        capacity = config.max_num_batched_tokens * spec.hidden_size
        region = _region_path(region_bytes(world, capacity)) if local and device.type == "cpu" else None
        try:
            shared = None
            if region is not None:
                create_region(region, world, capacity)
                shared = SharedMemoryCollectives(region, 0, world, capacity, self._alive)
            for rank in range(1, world):
                rank_settings = rank_config(config, rank) if local else config
                self.ranks.append(self._launcher.start(rank, {
                    "rank": rank, "world": world, "store": self._launcher.store_spec, "model_dir": str(model_dir),
                    "config": asdict(rank_settings),
                    "shared_memory": {"path": str(region), "capacity": capacity} if region else None}))
            self._wait_for_joins(world)
            self.group = TensorParallelGroup(Shard(0, world), device, self._launcher.store, shared)
        except BaseException:
            self.stop()
            raise
        finally:
            if region is not None:
                region.unlink(missing_ok=True)  # every rank has it mapped (or has failed): nothing left behind

    def _wait_for_joins(self, world: int) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
        waiting = set(range(1, world))
        while waiting or any(rank.steps is None for rank in self.ranks):
            self._launcher.connect(self.ranks)
            waiting -= {rank for rank in waiting if self._launcher.store.check([f"joined/{rank}"])}
            self.check()
            if time.monotonic() > deadline:
                raise RungError(f"tensor-parallel workers {sorted(waiting)} did not start within "
                                f"{JOIN_TIMEOUT_SECONDS:g} s")
            time.sleep(0.05)

    def _alive(self) -> bool:
        return all(rank.exit_status() is None for rank in self.ranks)

    def send(self, message: StepMessage | None) -> None:
        """The next step to every worker."""
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        for rank in self.ranks:
            try:
                rank.steps.write(payload)
                rank.steps.flush()
            except (BrokenPipeError, OSError):
                self.check()
                raise RungError("a tensor-parallel worker stopped reading its steps") from None

    def check(self) -> None:
        """Raise RungError if a worker has exited (an engine with a dead rank cannot compute a step), with the
        reason it left when it could not load."""
        for index, rank in enumerate(self.ranks, 1):
            status = rank.exit_status()
            if status is not None:
                if self._launcher.store.check([f"failed/{index}"]):
                    failure = json.loads(self._launcher.store.get(f"failed/{index}"))
                    raise ConfigError(failure["field"], failure["message"]) if failure["field"] else \
                        RungError(failure["message"])
                raise RungError(f"tensor-parallel worker {index} {status}")

    def explain(self, failure: RungError) -> RungError:
        """What a failed collective means: the worker that exited, when one did (given a moment to be reaped: its
        socket closes as it dies), else the failure itself."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                self.check()
            except RungError as exited:
                return exited
            time.sleep(0.05)
        return failure

    def stop(self) -> None:
        """Stop every worker (ending those that do not exit in time) and leave the group."""
        for rank in self.ranks:
            rank.stop()
        if hasattr(self, "group"):
            self.group.leave()
        self._launcher.close()
