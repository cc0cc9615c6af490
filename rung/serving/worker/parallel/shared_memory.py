"""The all-reduce and the logits' gather between tensor-parallel ranks on one machine's CPUs, through shared memory:
gloo's all-reduce over loopback TCP took ~2 ms for a 32 x 1024 fp32 tensor on the 2-core box (most of a small
model's step), as vLLM's CPU backend also found, which is why it sums through shared memory too.

One file in /dev/shm, mapped by every rank (rank 0 creates it, and unlinks it once every rank has mapped it, so
nothing is left behind whatever happens), holds SLOTS slots of one buffer per rank and two counters per rank. An
all-reduce is numbered (every rank issues the same ones in the same order): a rank copies its tensor into its
buffer of slot `number % SLOTS` and publishes the number (`start`); once every rank has published it, each sums the
slot's buffers in rank order — so every rank gets the same bits — and records it consumed (`Pending.wait`). A slot
is reused only once every rank has consumed what it held, so several all-reduces may be in flight (NanoFlow's
nano-batches: one's sum waits while the next one computes). A gather is numbered the same way; rank 0 alone reads
it, the others count it consumed at once. x86 keeps stores in order, so a published number is
seen only after the data written before it.

A rank waiting on its peers spins, and checks every few milliseconds that they are alive (`alive`), so a dead
peer fails the step instead of hanging it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rung.errors import RungError

SLOTS = 4  # all-reduces that may be in flight at once, plus room for the slowest rank to catch up
CHECK_EVERY_SECONDS = 0.005  # how often a waiting rank checks that its peers are alive


class PeerGone(RungError):
    """A rank waited on a peer that is no longer running."""


def region_bytes(world: int, capacity: int) -> int:
    """The file's size for `world` ranks and all-reduces of up to `capacity` fp32 values."""
    return _header(world) + SLOTS * world * capacity * 4


def _header(world: int) -> int:
    return 64 * ((16 * world + 63) // 64)  # two int64 counters per rank, padded to a cache line


def create_region(path: Path, world: int, capacity: int) -> None:
    """A zeroed file of the right size (sparse: pages are allocated as they are first written)."""
    with open(path, "wb") as file:
        file.truncate(region_bytes(world, capacity))


class SharedMemoryCollectives:
    """This rank's view of the region at `path`; `alive()` says whether every peer still runs. Every rank issues
    the same all-reduces and gathers in the same order."""

    def __init__(self, path: Path, rank: int, world: int, capacity: int, alive: Callable[[], bool]):
        self.rank, self.capacity, self._alive = rank, capacity, alive
        region = torch.from_file(str(path), shared=True, size=region_bytes(world, capacity), dtype=torch.uint8)
        self._published = region[:8 * world].view(torch.int64)
        self._consumed = region[8 * world:16 * world].view(torch.int64)
        self._buffers = region[_header(world):].view(torch.float32).view(SLOTS, world, capacity)
        self._number = 0

    def fits(self, tensor: torch.Tensor) -> bool:
        return tensor.numel() <= self.capacity

    def start(self, tensor: torch.Tensor) -> Pending:
        """Publish this rank's `tensor` (contiguous, at most `capacity` values) for the next all-reduce."""
        return Pending(self, tensor, self._publish(tensor))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `tensor` [rows, columns] (at most `capacity` values) side by side, [rows, N x columns], on
        rank 0; None elsewhere."""
        number = self._publish(tensor)
        if self.rank != 0:
            self._consumed[self.rank] = number
            return None
        self._spin(lambda: int(self._published.min()) >= number)
        rows, columns = tensor.shape
        parts = self._buffers[number % SLOTS, :, :tensor.numel()].view(-1, rows, columns)
        gathered = parts.permute(1, 0, 2).reshape(rows, -1).to(tensor.dtype)  # a copy: the slot may be reused
        self._consumed[0] = number
        return gathered

    def _publish(self, tensor: torch.Tensor) -> int:
        self._number += 1
        number = self._number
        self._spin(lambda: int(self._consumed.min()) >= number - SLOTS)  # the slot's last use is read everywhere
        self._buffers[number % SLOTS, self.rank, :tensor.numel()].copy_(tensor.reshape(-1))
        self._published[self.rank] = number
        return number

    def finish(self, tensor: torch.Tensor, number: int) -> None:
        self._spin(lambda: int(self._published.min()) >= number)
        values = tensor.numel()
        tensor.view(-1).copy_(self._buffers[number % SLOTS, :, :values].sum(0))
        self._consumed[self.rank] = number

    def _spin(self, ready: Callable[[], bool]) -> None:
        checked = time.monotonic()
        while not ready():
            if time.monotonic() - checked > CHECK_EVERY_SECONDS:
                if not self._alive():
                    raise PeerGone("a tensor-parallel peer stopped while this rank waited on it")
                checked = time.monotonic()
                os.sched_yield()


class Pending:
    """An all-reduce this rank has published: `wait()` sums it into the tensor once every rank has."""

    def __init__(self, owner: SharedMemoryCollectives, tensor: torch.Tensor, number: int):
        self._owner, self._tensor, self._number = owner, tensor, number

    def wait(self) -> None:
        self._owner.finish(self._tensor, self._number)
