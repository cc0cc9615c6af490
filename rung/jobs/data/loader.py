"""Deterministic batches: which sequences a rank trains on is a pure function of (step, rank, world size, seed).

The token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets), which never
cross a shard boundary. Each epoch visits every window once in a seeded permutation; the global batch of step s is
positions [s·B, (s+1)·B) of the epoch-concatenated order, and rank r of W takes the r-th contiguous slice. So a
resumed run continues exactly where it stopped, and no two ranks ever see the same window within an epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from rung.errors import ConfigError
from rung.jobs.data.shards import PreparedData, load_shards


class SequenceLoader:
    def __init__(self, data: PreparedData, seq_len: int, global_batch: int, seed: int):
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.seed = seed
        self.shards = load_shards(data.path, data.manifest)
        windows = np.array([(s.size - 1) // seq_len if s.size > seq_len else 0 for s in self.shards], dtype=np.int64)
        self.num_sequences = int(windows.sum())
        if self.num_sequences < global_batch:
            raise ConfigError("train.global_batch", f"the corpus holds only {self.num_sequences} sequences of "
                              f"{seq_len + 1} tokens, fewer than one global batch ({global_batch})")
        self._shard_starts = np.concatenate([[0], np.cumsum(windows)])
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation; only the newest two are kept (a batch spans at most one boundary)."""
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
            for old in sorted(self._orders)[:-2]:
                del self._orders[old]
        return self._orders[epoch]

    def sequence_ids(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Global indices of the windows rank `rank` trains on at `step`."""
        if self.global_batch % world_size:
            raise ConfigError("train.global_batch", f"{self.global_batch} is not divisible by {world_size} workers")
        per_rank = self.global_batch // world_size
        positions = step * self.global_batch + rank * per_rank + np.arange(per_rank)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def window(self, sequence_id: int) -> np.ndarray:
        shard = int(np.searchsorted(self._shard_starts, sequence_id, side="right") - 1)
        start = (sequence_id - self._shard_starts[shard]) * self.seq_len
        return np.asarray(self.shards[shard][start: start + self.seq_len + 1], dtype=np.int64)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [global_batch / world_size, seq_len] int64."""
        tokens = torch.from_numpy(np.stack([self.window(int(i)) for i in self.sequence_ids(step, rank, world_size)]))
        return tokens[:, :-1], tokens[:, 1:]
