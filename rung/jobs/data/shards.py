"""Token shards: a directory of flat uint16/uint32 token files plus `manifest.json`, built atomically and cached.

Two shard sets: training (`shard_NNNNN.bin`) and validation (`validation_NNNNN.bin`), the documents held out before
tokenization — `data.validation_sources`, or by position in the corpus (`held_out`) — so no validation text is
in any training shard, and the trained tokenizer never saw it. The directory is assembled under a temporary name
and renamed into place only when complete, and the manifest is the last file written, so a crash or bad input
never leaves a directory that looks usable. The cache key covers the data config and every source file's path,
size and mtime: re-running `prepare` with the same inputs is free. How the encoding ran (one process, or Ray Data
workers) is not in the key: both write the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
from tokenizers import Tokenizer

from rung.config import to_dict
from rung.errors import DataError
from rung.jobs.config import DataConfig
from rung.jobs.data.corpus import BUILTIN, Part, plan_parts, read_part, resolve_sources
from rung.jobs.data.encoding import EncodedBlock, connect_ray, encode_blocks, plan_blocks
from rung.jobs.data.tokenizer import eos_id, load_tokenizer_folder, tokenizer_hash, train_bpe
from rung.platform.progress import Progress

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = 2
Split = Literal["train", "validation"]
_FILE_PREFIX: dict[Split, str] = {"train": "shard", "validation": "validation"}
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PreparedData:
    path: Path
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def num_tokens(self) -> int:
        """Training tokens."""
        return self.manifest["num_tokens"]

    @property
    def validation(self) -> dict | None:
        """The validation split's record (num_tokens, num_documents, shards, held_out), or None without one."""
        return self.manifest["validation"]

    def shards(self, split: Split) -> list[dict]:
        return self.manifest["shards"] if split == "train" else (self.validation or {}).get("shards", [])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))


def held_out(index: int, fraction: float) -> bool:
    """Whether document `index` (0-based, in corpus order) is a validation document: the first, then one in every
    1/fraction, evenly spread — so the split has at least one document and about `fraction` of them."""
    return fraction > 0 and math.ceil((index + 1) * fraction) > math.ceil(index * fraction)


def within_budget(items: Iterable[tuple[int, T]], max_bytes: int | None) -> Iterator[T]:
    """Items of (size, value) until the next would pass `max_bytes`; the first is always taken whole."""
    total = 0
    for size, value in items:
        if max_bytes is not None and total and total + size > max_bytes:
            return
        total += size
        yield value


def prepare(cfg: DataConfig, log=print, workers: int = 0, address: str | None = None) -> PreparedData:
    """Tokenize the configured corpus into shards (or reuse the cached result) and return its location.

    `workers` > 0 encodes on Ray Data with that many workers (on the cluster at `address`, else an embedded one)."""
    files = resolve_sources(cfg.sources)
    validation_files = resolve_sources(cfg.validation_sources) if cfg.validation_sources else []
    key = _cache_key(cfg, files + validation_files)
    final = Path(cfg.cache_dir) / key
    if (final / MANIFEST).is_file():
        return PreparedData(final, json.loads((final / MANIFEST).read_text()))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _build(cfg, files, validation_files, staging, log, workers, address)
        if (final / MANIFEST).is_file():  # another process finished the same data first: use theirs
            return PreparedData(final, json.loads((final / MANIFEST).read_text()))
        shutil.rmtree(final, ignore_errors=True)  # a leftover without a manifest is incomplete by definition
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(final, manifest)


class ShardWriter:
    """One split's shard files: documents appended in order, cut into files of exactly `shard_tokens` (the last
    shorter)."""

    def __init__(self, out: Path, split: Split, dtype: np.dtype, shard_tokens: int):
        self.out, self.prefix, self.dtype, self.shard_tokens = out, _FILE_PREFIX[split], dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_size = self.num_tokens = self.num_documents = 0
        self.shards: list[dict] = []

    def add(self, ids: np.ndarray) -> None:
        self.pending.append(ids)
        self.pending_size += ids.size
        self.num_tokens += ids.size
        self.num_documents += 1
        if self.pending_size >= self.shard_tokens:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        flat = np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)
        start = 0
        while flat.size - start >= self.shard_tokens or final and start < flat.size:
            tokens = flat[start: start + self.shard_tokens]
            name = f"{self.prefix}_{len(self.shards):05d}.bin"
            tokens.tofile(self.out / name)
            self.shards.append({"file": name, "num_tokens": int(tokens.size),
                                "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()})
            start += tokens.size
        self.pending = [flat[start:]]
        self.pending_size = flat.size - start

    def close(self) -> dict:
        self._write(final=True)
        return {"num_tokens": self.num_tokens, "num_documents": self.num_documents, "shards": self.shards}


def _build(cfg: DataConfig, files: list[Path], validation_files: list[Path], out: Path, log, workers: int,
           address: str | None) -> dict:
    parts = plan_parts(files, cfg.text_field)
    validation_parts = plan_parts(validation_files, cfg.text_field)
    if workers > 0:
        connect_ray(workers, address)
    fraction = 0.0 if validation_parts else cfg.validation_fraction
    if cfg.tokenizer is None:
        log(f"data: training a byte-level BPE ({cfg.vocab_size} tokens) on up to {cfg.tokenizer_sample_bytes:,} "
            f"bytes of training documents")
        tokenizer = train_bpe(_tokenizer_sample(parts, cfg, fraction), cfg.vocab_size)
    else:
        tokenizer = load_tokenizer_folder(cfg.tokenizer)
    tokenizer.save(str(out / TOKENIZER_FILE))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)
    separator = eos_id(tokenizer)
    writers = {split: ShardWriter(out, split, dtype, cfg.shard_tokens) for split in ("train", "validation")}
    blocks = plan_blocks(parts)
    log(f"data: encoding {len(files)} files ({len(blocks)} blocks) "
        + (f"on Ray Data with {workers} workers" if workers else "in this process"))
    progress = _EncodingProgress(len(blocks), writers, log)
    stream = encode_blocks(blocks, tokenizer, cfg.text_field, separator, dtype, workers, address)
    documents = within_budget(_documents(stream, progress.block_done), cfg.max_bytes)
    try:
        for index, ids in enumerate(documents):
            writers["validation" if held_out(index, fraction) else "train"].add(ids)
    finally:
        stream.close()  # stopped by the byte budget: cancel what is still being encoded
    for block in encode_blocks(plan_blocks(validation_parts), tokenizer, cfg.text_field, separator, dtype, workers,
                               address):
        for _size, ids in block.documents():
            writers["validation"].add(ids)
    train, validation = (writers[split].close() for split in ("train", "validation"))
    _check_splits(cfg, files, train, validation)
    log(f"data: {train['num_tokens']:,} training tokens ({train['num_documents']:,} documents), "
        f"{validation['num_tokens']:,} validation tokens ({validation['num_documents']:,} documents)")
    manifest = {
        "format": FORMAT,
        **train,
        "validation": {**validation, "held_out": "validation_sources" if validation_parts else
                       f"validation_fraction {fraction} of documents"} if cfg.has_validation else None,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": separator,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "sources": [BUILTIN] if not cfg.sources else list(cfg.sources),
        "num_files": len(files),
        "config": to_dict(cfg),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence marks completeness
    return manifest


class _EncodingProgress:
    """A progress line — blocks done, documents and tokens per second, ETA — at most every few seconds."""

    def __init__(self, blocks: int, writers: dict[Split, ShardWriter], log, every: float = 5.0):
        self.progress = Progress("data: block", blocks, "tok")
        self.writers, self.log, self.every, self.last = writers, log, every, 0.0

    def block_done(self, done: int) -> None:
        now = time.perf_counter()
        if done < self.progress.total and now - self.last < self.every:
            return
        self.last = now
        tokens = sum(w.num_tokens for w in self.writers.values())
        docs = sum(w.num_documents for w in self.writers.values())
        rate = docs / max(now - self.progress.started, 1e-9)
        self.log(self.progress.line(done, tokens, f"{docs:,} docs ({rate:,.0f} docs/s), {tokens:,} tokens, "))


def _documents(stream: Iterator[EncodedBlock], on_block) -> Iterator[tuple[int, np.ndarray]]:
    """(text bytes, ids) of every document of every block, in order; `on_block(blocks done)` after each block."""
    for done, block in enumerate(stream, 1):
        yield from block.documents()
        on_block(done)


def _tokenizer_sample(parts: list[Part], cfg: DataConfig, fraction: float) -> Iterator[str]:
    """The deterministic text the BPE trains on: training documents in corpus order, up to its byte budget."""
    sized = ((len(text.encode()), text) for part in parts for text in read_part(part, cfg.text_field))
    read = within_budget(((size, (size, text)) for size, text in sized), cfg.max_bytes)
    training = (pair for index, pair in enumerate(read) if not held_out(index, fraction))
    return within_budget(training, cfg.tokenizer_sample_bytes)


def _check_splits(cfg: DataConfig, files: list[Path], train: dict, validation: dict) -> None:
    shown = ", ".join(map(str, files[:3])) + (" …" if len(files) > 3 else "")
    if train["num_tokens"] == 0 and validation["num_tokens"] == 0:
        raise DataError(f"the corpus is empty: no text in {shown}")
    if train["num_tokens"] == 0:
        raise DataError(f"every document of {shown} ({validation['num_documents']}; a plain-text file is one) was "
                        "held out for validation: nothing is left to train on. Give more documents, separate "
                        "data.validation_sources, or data.validation_fraction=0 (no validation split)")
    if cfg.has_validation and validation["num_tokens"] == 0:
        raise DataError("the validation split is empty: data.validation_sources hold no text "
                        f"({', '.join(cfg.validation_sources)})")


def _cache_key(cfg: DataConfig, files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    digest.update(sys.version.encode())  # the built-in corpus changes with the interpreter
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if cfg.tokenizer is not None:
        digest.update(load_tokenizer_folder(cfg.tokenizer).to_str().encode())
    return digest.hexdigest()[:16]


def load_shards(data: PreparedData, split: Split = "train") -> list[np.ndarray]:
    """Memory-map every shard of a split (read-only), checking sizes against the manifest."""
    arrays = []
    for shard in data.shards(split):
        array = np.memmap(data.path / shard["file"], dtype=data.manifest["dtype"], mode="r")
        if array.size != shard["num_tokens"]:
            raise DataError(f"shard {data.path / shard['file']} has {array.size} tokens, manifest says "
                            f"{shard['num_tokens']}")
        arrays.append(array)
    return arrays
