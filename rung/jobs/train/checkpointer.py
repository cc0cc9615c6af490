"""The checkpointer of a training run: where to resume from, when to save, and the mirror at `train.checkpoint_uri`.

Resuming: rank 0 picks the newest verified checkpoint, local or mirrored (hashing once), and tells the others its
step; a rank whose machine lacks that checkpoint fetches it from the mirror. Saving: every `train.checkpoint_every`
steps and at the last one (none with `train.keep_checkpoints = 0`), collectively, committed atomically, then
uploaded to the mirror.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from rung.jobs.config import RunConfig
from rung.jobs.run_dir import RunDir
from rung.jobs.train.checkpoint_io import load_checkpoint, save_checkpoint
from rung.platform.checkpoint import MANIFEST, CheckpointStore, RemoteMirror


class Checkpointer:
    def __init__(self, run_dir: RunDir, cfg: RunConfig):
        self.cfg = cfg
        self.store = CheckpointStore(run_dir.checkpoints, keep=cfg.train.keep_checkpoints)
        self.mirror = RemoteMirror(cfg.train.checkpoint_uri, cfg.train.keep_checkpoints) \
            if cfg.train.checkpoint_uri else None

    def resume_point(self, rank: int) -> Path | None:
        """Collective: the checkpoint every rank continues from, present on this machine; None for a fresh run."""
        chosen = torch.tensor([-1])
        if rank == 0:
            local = self.store.latest()
            remote = self.mirror.latest() if self.mirror is not None else None
            chosen[0] = max(local[0] if local else -1, remote if remote is not None else -1)
        dist.broadcast(chosen, src=0)
        step = int(chosen.item())
        if step < 0:
            return None
        path = self.store.root / self.store.name(step)
        if not (path / MANIFEST).is_file() and self.mirror is not None:
            self.mirror.download(step, self.store.root)
        return path

    def load(self, engine, path: Path) -> tuple[int, int]:
        """Collective: restore every rank from `path`. Returns (step, tokens) to continue from."""
        return load_checkpoint(engine, path, self.cfg)

    def due(self, step: int) -> bool:
        """Whether (1-based) step `step` ends with a checkpoint."""
        train = self.cfg.train
        return bool(train.keep_checkpoints) and ((train.checkpoint_every and step % train.checkpoint_every == 0)
                                                 or step == train.steps)

    def save(self, engine, step: int, tokens: int) -> tuple[Path | None, float]:
        """Collective: (the committed directory on rank 0, None elsewhere; the seconds it took)."""
        started = time.perf_counter()
        path = save_checkpoint(engine, self.store, self.cfg, step, tokens, self.mirror)
        return path, time.perf_counter() - started
