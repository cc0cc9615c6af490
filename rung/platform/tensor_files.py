"""Safetensors files. Reading one that may be damaged: checksums prove the bytes are the ones written, not that the
writer wrote a valid file, so every reader of weights (resume, export, serving) refuses a bad file the same way.
Writing a model folder's weights, sharded as Hugging Face does (export, `rung quantize`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rung.errors import RungError


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, or a RungError naming the file and what is wrong with it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:  # a truncated or garbled header, a short file
        reason = " ".join(str(err).split())
        raise RungError(f"{path} is not a readable safetensors file: {reason}"[:400]) from None


def write_sharded(tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = 5 << 30) -> None:
    """`tensors` as a Hugging Face folder's weights: one model.safetensors, or shards of at most `max_shard_bytes`
    with model.safetensors.index.json mapping each tensor to its file."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
