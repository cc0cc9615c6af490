"""How rank 0 starts the other ranks on this machine, and what it asks of any way of starting them (`Launcher`,
`Rank`; Ray actors are the other way, `ray_ranks.py`): the store they join, and a step stream to each."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

import torch
import torch.distributed as dist

from rung.serving.worker.parallel.group import COLLECTIVE_TIMEOUT

STOP_SECONDS = 10.0  # how long a worker may take to exit once its step stream closes


def open_store(spec: dict, world: int, host: bool = False) -> dist.Store:
    """The group's key-value store from its description: {"file": path} or {"host": ip, "port": n}; `host`: rank
    0's side of a TCP store (it listens)."""
    if "file" in spec:
        return dist.FileStore(spec["file"], world)
    return dist.TCPStore(spec["host"], spec["port"], world, is_master=host, timeout=COLLECTIVE_TIMEOUT,
                         wait_for_workers=False)


class Rank(Protocol):
    """One worker as rank 0 sees it."""

    steps: BinaryIO | None  # where its steps are written; None until it has connected

    def exit_status(self) -> str | None:
        """None while it runs; else how it ended."""

    def stop(self) -> None:
        """Close its step stream, and end it if it has not exited within STOP_SECONDS."""


class Launcher(Protocol):
    """How the workers are started and reached: the store they join and their step streams."""

    store_spec: dict
    store: dist.Store

    def start(self, rank: int, settings: dict) -> Rank: ...

    def connect(self, ranks: list[Rank]) -> None:
        """Attach the step streams of workers that have connected since (a no-op where they come with the
        process)."""

    def close(self) -> None: ...


class LocalRank:
    """A worker as a subprocess of this process; its steps go to its stdin."""

    def __init__(self, settings: dict):
        self.process = subprocess.Popen([sys.executable, "-m", "rung.serving.worker.parallel.worker_process",
                                         json.dumps(settings)], stdin=subprocess.PIPE)
        self.steps = self.process.stdin

    def exit_status(self) -> str | None:
        code = self.process.poll()
        return None if code is None else f"exited (code {code})"

    def stop(self) -> None:
        try:
            self.steps.close()  # end of steps: the worker exits
        except OSError:
            pass
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class LocalLauncher:
    """Workers as subprocesses on this machine, joined through a file store."""

    def __init__(self, world: int, device: torch.device):
        """`device` is the launcher interface's: processes and a file store serve CPUs and GPUs alike."""
        self._folder = tempfile.TemporaryDirectory(prefix="rung-tp-")
        self.store_spec = {"file": str(Path(self._folder.name) / "store")}
        self.store = open_store(self.store_spec, world)

    def start(self, rank: int, settings: dict) -> Rank:
        return LocalRank(settings)

    def connect(self, ranks: list[Rank]) -> None:
        pass

    def close(self) -> None:
        self._folder.cleanup()
