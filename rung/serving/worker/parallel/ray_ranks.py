"""Tensor-parallel workers as Ray actors (`--distributed-backend ray`), for a model split across nodes: a placement
group reserves one bundle per worker (a GPU each on GPU clusters, a CPU otherwise) wherever the cluster has them,
and each actor runs the same worker loop as a local process (`worker_process.serve_shard`), its steps read from a
TCP connection to rank 0 and the group joined through a TCP store rank 0 hosts on its node's address.

Rank 0 is the engine process itself, outside Ray's accounting: on a GPU node it computes on that node's first GPU,
so Ray should be told of one GPU fewer there (`ray start --num-gpus`), or the engine run on a node without a worker.
"""

from __future__ import annotations

import json
import socket

import torch

from rung.errors import ConfigError, RungError
from rung.platform.cluster import connect
from rung.serving.worker.parallel.launch import STOP_SECONDS, open_store

import ray  # noqa: E402  (rung.platform.cluster sets Ray's environment before it is imported)
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402


class RankActor:
    """A worker inside a Ray actor."""

    def serve(self, settings: dict, steps_address: tuple[str, int]) -> None:
        from rung.platform.runtime import configure_process
        from rung.serving.worker.parallel.worker_process import serve_shard

        configure_process()
        with socket.create_connection(steps_address) as connection:
            connection.sendall(json.dumps({"rank": settings["rank"]}).encode() + b"\n")
            serve_shard(settings, connection.makefile("rb"))


class RayRank:
    """A worker actor as rank 0 sees it; its step stream is attached when its connection arrives."""

    def __init__(self, actor, settings: dict, steps_address: tuple[str, int]):
        self.actor = actor
        self.done = actor.serve.remote(settings, steps_address)
        self.steps = None
        self._connection: socket.socket | None = None

    def attach(self, connection: socket.socket) -> None:
        self._connection = connection
        self.steps = connection.makefile("wb")

    def exit_status(self) -> str | None:
        ready, _ = ray.wait([self.done], timeout=0)
        if not ready:
            return None
        try:
            ray.get(self.done)
        except Exception as err:  # noqa: BLE001 - the actor's failure, reported as the worker's
            return f"failed ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        return "exited"

    def stop(self) -> None:
        for stream in (self.steps, self._connection):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            ray.get(self.done, timeout=STOP_SECONDS)
        except Exception:  # noqa: BLE001 - stopped or failed: either way it goes
            ray.kill(self.actor)


class RayLauncher:
    """Connects to Ray (RAY_ADDRESS, or an embedded cluster), checks the cluster can place every worker, reserves
    their bundles, and hosts the store and the step listener on this node's address."""

    def __init__(self, world: int, device: torch.device):
        cluster = connect()
        gpu = device.type == "cuda"
        have = cluster.gpus if gpu else cluster.cpus
        if world - 1 > have:
            raise ConfigError("tensor_parallel_size", f"is {world}: {world - 1} workers need {world - 1} "
                              f"{'GPUs' if gpu else 'CPUs'} in the Ray cluster, which has {have:g}")
        self._bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self._group = placement_group([self._bundle] * (world - 1), strategy="PACK")
        ready, _ = ray.wait([self._group.ready()], timeout=60)
        if not ready:
            remove_placement_group(self._group)
            raise RungError(f"Ray could not place {world - 1} tensor-parallel workers within 60 s")
        host = ray.util.get_node_ip_address()
        self.store_spec = {"host": host, "port": 0}
        self.store = open_store(self.store_spec, world, host=True)
        self.store_spec["port"] = self.store.port
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self._address = (host, self._listener.getsockname()[1])

    def start(self, rank: int, settings: dict) -> RayRank:
        gpu = "GPU" in self._bundle
        # inside an actor Ray exposes only its own GPU, as device 0
        config = {**settings["config"], "device": "cuda:0"} if gpu else settings["config"]
        actor = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0)(RankActor).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, rank - 1)).remote()
        return RayRank(actor, {**settings, "config": config}, self._address)

    def connect(self, ranks: list[RayRank]) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except BlockingIOError:
                return
            connection.setblocking(True)
            rank = json.loads(connection.makefile("rb").readline())["rank"]
            ranks[rank - 1].attach(connection)

    def close(self) -> None:
        self._listener.close()
        remove_placement_group(self._group)
