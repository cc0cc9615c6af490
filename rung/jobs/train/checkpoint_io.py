"""Save and restore a training run's complete state through the checkpoint store, with no pickle anywhere.

A checkpoint holds consolidated fp32 weights (the file export reads), the optimizer state (AdamW moments, Muon
momentum), its state (step, tokens, the model shape and parametrization it was trained with) and each worker's RNG —
named in `rung.jobs.run_dir`. The data
position needs no file: batches are a function of the step.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from rung.config import to_dict
from rung.errors import ConfigError
from rung.jobs.config import RunConfig
from rung.jobs.run_dir import OPTIMIZER, STATE, WEIGHTS, rng_file
from rung.jobs.train.engine_state import gather_state, restore_state
from rung.platform.checkpoint import CheckpointStore, RemoteMirror
from rung.platform.tensor_files import load_tensors


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_checkpoint(engine, store: CheckpointStore, cfg: RunConfig, step: int, tokens: int,
                    mirror: RemoteMirror | None = None) -> Path | None:
    """Collective: every rank calls it. Returns the committed directory on rank 0, None elsewhere."""
    rank = dist.get_rank()
    weights, moments = gather_state(engine)
    if rank == 0:
        store.staging(step)
    dist.barrier()
    staging = store.staging_path(step)
    save_file(_rng_state(), str(staging / rng_file(rank)))
    dist.barrier()
    final = None
    if rank == 0:
        save_file(weights, str(staging / WEIGHTS))
        save_file(moments, str(staging / OPTIMIZER))
        state = {"step": step, "tokens": tokens, "world_size": dist.get_world_size(),
                 "zero_stage": cfg.train.zero_stage, "dtype": cfg.train.dtype, "optimizer": cfg.train.optimizer,
                 "model": to_dict(cfg.model), "param": to_dict(cfg.param)}
        (staging / STATE).write_text(json.dumps(state, indent=2))
        final = store.commit(staging, step)
        if mirror is not None:
            mirror.upload(final)
    dist.barrier()
    return final


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def check_compatible(path: Path, cfg: RunConfig) -> None:
    """Refuse to resume a checkpoint into a model of another shape (the weights would not fit, or worse, would), or
    under another optimizer (its state would be missing)."""
    state = read_state(path)
    saved = state.get("optimizer", "adamw")  # checkpoints older than the setting are AdamW's
    if saved != cfg.train.optimizer:
        raise ConfigError("train.optimizer", f"the checkpoint {path} holds {saved}'s state; resume with "
                          f"train.optimizer={saved}")
    if state["model"] != to_dict(cfg.model):
        differing = sorted(k for k in state["model"] if state["model"][k] != to_dict(cfg.model).get(k))
        raise ConfigError("model", f"the checkpoint {path} was trained with a different model shape "
                          f"(differs in {', '.join(differing)}); resume with the same model config")


def load_checkpoint(engine, path: Path, cfg: RunConfig) -> tuple[int, int]:
    """Collective: restore every rank from `path`. Returns (step, tokens) to continue from."""
    check_compatible(path, cfg)
    state = read_state(path)
    restore_state(engine, load_tensors(path / WEIGHTS), load_tensors(path / OPTIMIZER), state["step"])
    rng = path / rng_file(dist.get_rank())
    if rng.is_file() and state["world_size"] == dist.get_world_size():
        saved = load_tensors(rng)
        torch.set_rng_state(saved["cpu"])
        if "cuda" in saved and torch.cuda.is_available():
            torch.cuda.set_rng_state(saved["cuda"])
    else:
        warnings.warn(f"resuming on {dist.get_world_size()} workers from a {state['world_size']}-worker "
                      "checkpoint: random streams start afresh", stacklevel=2)
    return state["step"], state["tokens"]
