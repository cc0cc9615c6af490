"""The collectives of a tensor-parallel forward, over one torch.distributed process group (NCCL between GPUs, gloo
between CPU processes). The model issues three kinds: the sum of row-parallel partial outputs (all-reduce, which
may run asynchronously while another nano-batch computes), the embedding lookup's sum over vocabulary shards, and
the gather of every rank's vocabulary slice of the logits onto rank 0, which samples. Between CPU processes on one
machine the all-reduces and the gather go through shared memory instead (`shared_memory.py` says why)."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from rung.errors import RungError
from rung.serving.worker.parallel.shared_memory import PeerGone, Pending, SharedMemoryCollectives
from rung.serving.worker.parallel.sharding import Shard

# a collective waits this long for a peer before failing (a peer that dies is noticed at once: its socket closes)
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


Handle = dist.Work | Pending  # an all-reduce in flight, whichever way it goes


class CollectiveFailed(RungError):
    """A peer rank went away or stopped answering mid-collective."""


class TensorParallelGroup:
    """This process's rank in the group, joined through `store` (rank 0 hosts it, `workers.py`); joining blocks
    until every rank has joined."""

    def __init__(self, shard: Shard, device: torch.device, store: dist.Store,
                 shared: SharedMemoryCollectives | None = None):
        self.shard, self.device, self.shared = shard, device, shared
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=shard.rank,
                                    world_size=shard.world, timeout=COLLECTIVE_TIMEOUT)
        except RuntimeError as err:
            raise CollectiveFailed(f"tensor-parallel rank {shard.rank} could not join its group: {err}") from None

    @property
    def rank(self) -> int:
        return self.shard.rank

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> Handle | None:
        """Sum `tensor` (contiguous) over the ranks in place; with async_op, a handle for `wait` before reading it."""
        try:
            if self.shared is not None and self.shared.fits(tensor):
                pending = self.shared.start(tensor)
                if async_op:
                    return pending
                pending.wait()
                return None
            return dist.all_reduce(tensor, async_op=async_op)
        except (RuntimeError, PeerGone) as err:
            raise CollectiveFailed(f"an all-reduce failed: {err}") from None

    def wait(self, work: Handle) -> None:
        """Wait for an asynchronous all-reduce to finish."""
        try:
            work.wait()
        except (RuntimeError, PeerGone) as err:
            raise CollectiveFailed(f"an all-reduce failed: {err}") from None

    def gather(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Every rank's `tensor` [rows, columns] side by side, [rows, N x columns], on rank 0; None elsewhere."""
        try:
            if self.shared is not None and self.shared.fits(tensor) and tensor.is_floating_point():
                return self.shared.gather(tensor.contiguous())  # (fp32 slots: integers would round)
            parts = [torch.empty_like(tensor) for _ in range(self.shard.world)] if self.rank == 0 else None
            dist.gather(tensor.contiguous(), parts, dst=0)
        except (RuntimeError, PeerGone) as err:
            raise CollectiveFailed(f"gathering the logits failed: {err}") from None
        return torch.cat(parts, dim=-1) if parts is not None else None

    def min(self, value: int) -> int:
        """The smallest of every rank's `value` (the KV blocks every rank's memory holds)."""
        tensor = torch.tensor([value], device=self.device)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        except RuntimeError as err:
            raise CollectiveFailed(f"agreeing on the KV pool's size failed: {err}") from None
        return int(tensor.item())

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
