"""Deterministic batches: which sequences a rank trains on is a pure function of (step, rank, world size, seed).

The token stream is cut into non-overlapping windows of seq_len + 1 tokens (inputs and shifted targets), which never
cross a shard boundary. Each epoch visits every window once in a seeded permutation; the global batch of step s is
positions [s·B, (s+1)·B) of the epoch-concatenated order, and rank r of W takes the r-th contiguous slice. So a
resumed run continues exactly where it stopped, and no two ranks ever see the same window within an epoch.

Training reads only the training shards; the validation set is a fixed, seeded sample of the validation shards'
windows, the same at every evaluation, split across ranks. Window indices and offsets are int64 throughout, so
a corpus of more than 2^32 tokens (or windows) is addressed exactly; shards stay memory-mapped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from rung.errors import ConfigError
from rung.jobs.data.shards import PreparedData, load_shards


class TokenWindows:
    """The windows of seq_len + 1 tokens of a list of shards (anything with `.size` and slicing)."""

    def __init__(self, shards: Sequence, seq_len: int):
        self.seq_len = seq_len
        self.shards = shards
        windows = np.array([(int(s.size) - 1) // seq_len if s.size > seq_len else 0 for s in shards], dtype=np.int64)
        self.num_sequences = int(windows.sum())
        self._shard_starts = np.concatenate([np.zeros(1, np.int64), np.cumsum(windows, dtype=np.int64)])

    def location(self, sequence_id: int) -> tuple[int, int]:
        """(shard index, first token's offset in that shard) of a window."""
        shard = int(np.searchsorted(self._shard_starts, np.int64(sequence_id), side="right") - 1)
        return shard, (int(sequence_id) - int(self._shard_starts[shard])) * self.seq_len

    def window(self, sequence_id: int) -> np.ndarray:
        shard, start = self.location(sequence_id)
        return np.asarray(self.shards[shard][start: start + self.seq_len + 1], dtype=np.int64)

    def stack(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [len(ids), seq_len] int64."""
        tokens = torch.from_numpy(np.stack([self.window(int(i)) for i in ids]))
        return tokens[:, :-1], tokens[:, 1:]


class SequenceLoader(TokenWindows):
    def __init__(self, data: PreparedData, seq_len: int, global_batch: int, seed: int):
        super().__init__(load_shards(data, "train"), seq_len)
        self.global_batch = global_batch
        self.seed = seed
        if self.num_sequences < global_batch:
            raise ConfigError("train.global_batch", f"the corpus holds only {self.num_sequences} sequences of "
                              f"{seq_len + 1} tokens, fewer than one global batch ({global_batch})")
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
        positions = np.int64(step) * self.global_batch + rank * per_rank + np.arange(per_rank, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        return np.array([self._order(int(e))[o] for e, o in zip(epochs, offsets)], dtype=np.int64)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [global_batch / world_size, seq_len] int64."""
        return self.stack(self.sequence_ids(step, rank, world_size))


class ValidationSet(TokenWindows):
    """`batches` × `global_batch` windows of the validation split (all of them if it holds fewer), drawn once with
    the run's seed: every evaluation of a run scores the same text, so its values are comparable step to step."""

    def __init__(self, data: PreparedData, seq_len: int, global_batch: int, batches: int, seed: int):
        super().__init__(load_shards(data, "validation"), seq_len)
        if self.num_sequences == 0:
            tokens = sum(int(s.size) for s in self.shards)
            raise ConfigError("data.validation_fraction", f"the validation split holds {tokens} tokens, fewer than "
                              f"one sequence of {seq_len + 1}: raise data.validation_fraction or give "
                              "data.validation_sources")
        order = np.random.default_rng([seed, 1 << 20]).permutation(self.num_sequences)
        self.ids = order[: batches * global_batch]

    def rank_batches(self, rank: int, world_size: int, micro_batch: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(inputs, targets, row weights) of this rank's share — every world_size-th window — in micro-batches.
        Every rank runs as many forwards: a shorter share is padded with weight-0 rows, so the whole set is scored
        once whatever the world size."""
        per_rank = -(-self.ids.size // world_size)
        mine = self.ids[rank::world_size]
        weights = torch.zeros(per_rank, dtype=torch.float64)
        weights[: mine.size] = 1.0
        padded = np.concatenate([mine, np.full(per_rank - mine.size, self.ids[0], dtype=np.int64)])
        for start in range(0, per_rank, micro_batch):
            yield (*self.stack(padded[start: start + micro_batch]), weights[start: start + micro_batch])
