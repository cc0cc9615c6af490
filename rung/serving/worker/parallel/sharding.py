"""Which part of each weight a tensor-parallel rank holds (Megatron-LM's layout, as vLLM's and SGLang's engines use
it), and reading only that part from the folder's safetensors files.

    q, k, v, gate, up       column-parallel: rank r holds its heads' / its FFN columns' rows; no communication
    o, down                 row-parallel: rank r holds the matching input columns; the partial sums are all-reduced
                            (a row-parallel bias is held by rank 0 alone, so the sum counts it once)
    KV heads                split across ranks, or, when there are fewer KV heads than ranks, each rank holds the
                            one KV head its query heads share (replicated)
    embedding, readout      vocab-parallel: rank r holds rows r·⌈V/N⌉ … (r+1)·⌈V/N⌉−1, the last rank's padded
                            with zeros; an embedding lookup is all-reduced, logits are gathered on rank 0
    MoE experts             split by tensor: every rank holds every expert's slice of the FFN width, so routing
                            stays local and a layer ends in one all-reduce, as a dense MLP does
    norms, routers          replicated
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from rung.errors import ConfigError, RungError
from rung.serving.worker.model_spec import ModelSpec

Piece = tuple[int, int, int]  # (dimension, start, stop) of a slice of a stored tensor


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `world` tensor-parallel ranks."""

    rank: int
    world: int

    def vocab_rows(self, spec: ModelSpec) -> int:
        """Rows of the embedding and readout each rank holds (the last rank's padded)."""
        return math.ceil(spec.vocab_size / self.world)

    def local_spec(self, spec: ModelSpec) -> ModelSpec:
        """The shapes this rank computes with: its query and KV heads and its share of the FFN widths (the
        vocabulary stays the model's: logits are gathered whole)."""
        return replace(spec, num_heads=spec.num_heads // self.world,
                       num_kv_heads=max(spec.num_kv_heads // self.world, 1),
                       intermediate_size=spec.intermediate_size // self.world,
                       shared_intermediate_size=spec.shared_intermediate_size // self.world)

    def pieces(self, spec: ModelSpec, name: str, shape: tuple[int, ...]) -> list[Piece] | None:
        """The slices of stored tensor `name` (of `shape`) this rank holds, concatenated along their dimension;
        None: the whole tensor; []: none of it."""
        r, n = self.rank, self.world
        local = self.local_spec(spec)
        head = spec.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            rows = self.vocab_rows(spec)
            return [(0, r * rows, min((r + 1) * rows, spec.vocab_size))]
        part = name.split(".")[-2] if name.count(".") >= 2 else ""
        kind = name.rsplit(".", 1)[-1]
        if part == "q_proj":
            return [(0, r * local.num_heads * head, (r + 1) * local.num_heads * head)]
        if part in ("k_proj", "v_proj"):
            first = r * spec.num_kv_heads // n  # the first KV head its query heads use
            return [(0, first * head, (first + local.num_kv_heads) * head)]
        if part == "o_proj":
            if kind == "bias":
                return None if r == 0 else []
            return [(1, r * local.num_heads * head, (r + 1) * local.num_heads * head)]
        if part in ("gate_proj", "up_proj", "w1", "w3"):
            return [(0, r * local.intermediate_size, (r + 1) * local.intermediate_size)]
        if part in ("down_proj", "w2"):
            if kind == "bias":
                return None if r == 0 else []
            return [(len(shape) - 1, r * local.intermediate_size, (r + 1) * local.intermediate_size)]
        if part in ("input_linear", "output_linear"):  # Granite's stacked experts and shared expert
            width = local.shared_intermediate_size if ".shared_mlp." in name else local.intermediate_size
            full = width * n
            if part == "output_linear":
                return [(len(shape) - 1, r * width, (r + 1) * width)]
            dim = len(shape) - 2  # gate rows then up rows
            return [(dim, r * width, (r + 1) * width), (dim, full + r * width, full + (r + 1) * width)]
        return None


def check_tensor_parallel(spec: ModelSpec, world: int, device: torch.device, local: bool = True) -> None:
    """Refuse a tensor-parallel size this model (or, for ranks on this machine, `local`, this machine) cannot take,
    naming why, before any worker starts."""
    if world == 1:
        return
    widths = {"attention heads": spec.num_heads, "FFN width (intermediate_size)": spec.intermediate_size}
    if spec.shared_intermediate_size:
        widths["shared expert's width"] = spec.shared_intermediate_size
    for what, size in widths.items():
        if size % world:
            raise ConfigError("tensor_parallel_size", f"{world} does not divide the model's {what} ({size})")
    kv = spec.num_kv_heads
    if kv % world if kv >= world else world % kv:
        raise ConfigError("tensor_parallel_size", f"{world} ranks cannot split or replicate the model's {kv} KV "
                          "heads (one must divide the other)")
    present = torch.cuda.device_count() if device.type == "cuda" else len(_cpus())
    if local and world > present:
        unit = "GPUs" if device.type == "cuda" else "CPU cores this process may use"
        raise ConfigError("tensor_parallel_size", f"is {world}, but there are only {present} {unit}")


def _cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def load_shard(folder: Path, files: list[str], spec: ModelSpec, shard: Shard
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """This rank's part of every tensor of the folder's safetensors `files`, reading only those bytes; every
    tensor's whole shape (as a meta tensor, for the checks against config.json); and how many bytes it read (what a
    test checks is ~1/N of the model)."""
    weights, shapes, read = {}, {}, 0
    for file in files:
        try:
            with safe_open(str(folder / file), framework="pt") as handle:
                for name in handle.keys():
                    stored = handle.get_slice(name)
                    shape = tuple(stored.get_shape())
                    shapes[name] = torch.empty(shape, device="meta")
                    pieces = shard.pieces(spec, name, shape)
                    if pieces == []:
                        continue
                    if pieces is None:
                        tensor = stored[:]
                    else:
                        tensor = torch.cat([stored[(slice(None),) * dim + (slice(start, stop),)]
                                            for dim, start, stop in pieces], dim=pieces[0][0])
                    read += tensor.numel() * tensor.element_size()
                    weights[name] = _padded_vocab(tensor, shard.vocab_rows(spec)) \
                        if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor
        except (SafetensorError, OSError, ValueError) as err:
            reason = " ".join(str(err).split())
            raise RungError(f"{folder / file} is not a readable safetensors file: {reason}"[:400]) from None
    return weights, shapes, read


def _padded_vocab(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The last rank's vocabulary rows padded with zeros to every rank's count (their logits are cut off after the
    gather; no token id reaches them)."""
    if rows.shape[0] == count:
        return rows
    return torch.cat([rows, rows.new_zeros(count - rows.shape[0], *rows.shape[1:])])
