"""Token shards: a directory of flat uint16/uint32 token files plus `manifest.json`, built atomically and cached.

The directory is assembled under a temporary name and renamed into place only when complete, and the manifest is
the last file written, so a crash or bad input never leaves a directory that looks usable. The cache key covers the
data config and every source file's path, size and mtime: re-running `prepare` with the same inputs is free.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from rung.config import to_dict
from rung.errors import DataError
from rung.jobs.config import DataConfig
from rung.jobs.data.corpus import BUILTIN, iter_documents, resolve_sources
from rung.jobs.data.tokenizer import eos_id, load_tokenizer_folder, tokenizer_hash, train_bpe

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


@dataclass(frozen=True, slots=True)
class PreparedData:
    path: Path
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def num_tokens(self) -> int:
        return self.manifest["num_tokens"]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.tokenizer_path))


def prepare(cfg: DataConfig, log=print) -> PreparedData:
    """Tokenize the configured corpus into shards (or reuse the cached result) and return its location."""
    files = resolve_sources(cfg.sources)
    if not files:
        raise DataError("the corpus has no files")
    key = _cache_key(cfg, files)
    final = Path(cfg.cache_dir) / key
    if (final / MANIFEST).is_file():
        return PreparedData(final, json.loads((final / MANIFEST).read_text()))
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{key}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _build(cfg, files, staging, log)
        if (final / MANIFEST).is_file():  # another process finished the same data first: use theirs
            return PreparedData(final, json.loads((final / MANIFEST).read_text()))
        shutil.rmtree(final, ignore_errors=True)  # a leftover without a manifest is incomplete by definition
        staging.rename(final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreparedData(final, manifest)


def _build(cfg: DataConfig, files: list[Path], out: Path, log) -> dict:
    started = time.perf_counter()
    if cfg.tokenizer is None:
        log(f"data: training a byte-level BPE ({cfg.vocab_size} tokens) on {len(files)} files")
        tokenizer = train_bpe(iter_documents(files, cfg.max_bytes), cfg.vocab_size)
    else:
        tokenizer = load_tokenizer_folder(cfg.tokenizer)
    tokenizer.save(str(out / TOKENIZER_FILE))
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
    separator = eos_id(tokenizer)
    shards, documents, num_tokens = [], 0, 0
    for index, tokens in enumerate(_chunks(tokenizer, files, cfg, separator, dtype)):
        name = f"shard_{index:05d}.bin"
        tokens.tofile(out / name)
        shards.append({"file": name, "num_tokens": int(tokens.size),
                       "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()})
        num_tokens += int(tokens.size)
        documents += int((tokens == separator).sum())
        rate = num_tokens / max(time.perf_counter() - started, 1e-9)
        log(f"data: shard {index} written, {num_tokens:,} tokens ({rate:,.0f} tok/s)")
    if num_tokens == 0:
        raise DataError(f"the corpus is empty: no text in {', '.join(map(str, files[:3]))}"
                        + (" …" if len(files) > 3 else ""))
    manifest = {
        "format": 1,
        "num_tokens": num_tokens,
        "num_documents": documents,
        "dtype": np.dtype(dtype).name,
        "vocab_size": vocab_size,
        "eos_id": separator,
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "sources": [BUILTIN] if not cfg.sources else list(cfg.sources),
        "num_files": len(files),
        "shards": shards,
        "config": to_dict(cfg),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence marks completeness
    return manifest


def _chunks(tokenizer: Tokenizer, files: list[Path], cfg: DataConfig, separator: int, dtype) -> Iterator[np.ndarray]:
    """Token arrays of about `shard_tokens` each: every document followed by the separator."""
    pending: list[np.ndarray] = []
    pending_size = 0
    batch: list[str] = []
    for document in iter_documents(files, cfg.max_bytes):
        batch.append(document)
        if len(batch) < 64:
            continue
        for ids in _encode(tokenizer, batch, separator, dtype):
            pending.append(ids)
            pending_size += ids.size
        batch = []
        while pending_size >= cfg.shard_tokens:
            flat = np.concatenate(pending)
            yield flat[: cfg.shard_tokens]
            pending, pending_size = [flat[cfg.shard_tokens:]], flat.size - cfg.shard_tokens
    pending.extend(_encode(tokenizer, batch, separator, dtype))
    flat = np.concatenate(pending) if pending else np.empty(0, dtype)
    for start in range(0, flat.size, cfg.shard_tokens):
        yield flat[start: start + cfg.shard_tokens]


def _encode(tokenizer: Tokenizer, documents: list[str], separator: int, dtype) -> list[np.ndarray]:
    if not documents:
        return []
    return [np.array(e.ids + [separator], dtype=dtype) for e in tokenizer.encode_batch(documents)]


def _cache_key(cfg: DataConfig, files: list[Path]) -> str:
    digest = hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode())
    digest.update(sys.version.encode())  # the built-in corpus changes with the interpreter
    for path in files:
        stat = path.stat()
        digest.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    if cfg.tokenizer is not None:
        digest.update(load_tokenizer_folder(cfg.tokenizer).to_str().encode())
    return digest.hexdigest()[:16]


def load_shards(path: Path, manifest: dict) -> list[np.ndarray]:
    """Memory-map every shard (read-only), checking sizes against the manifest."""
    arrays = []
    for shard in manifest["shards"]:
        array = np.memmap(path / shard["file"], dtype=manifest["dtype"], mode="r")
        if array.size != shard["num_tokens"]:
            raise DataError(f"shard {path / shard['file']} has {array.size} tokens, manifest says {shard['num_tokens']}")
        arrays.append(array)
    return arrays
