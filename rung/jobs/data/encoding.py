"""Tokenizing a corpus: blocks of parts encoded into token arrays, in this process or as Ray Data tasks.

A block is a run of consecutive parts (up to 64 small files, or one Parquet row group / Arrow or JSONL file) that
one task reads and encodes with `encode_batch`. Either way the blocks come back in their order, each as its
documents' token arrays (every document followed by the separator) and their text sizes, so the shards the caller
writes are byte-for-byte the same whatever ran the encoding: a document's ids depend only on its text.

On Ray the blocks are a Ray Dataset mapped by a pool of `workers` encoder actors (each loads the tokenizer once)
with order preserved and a bounded number of blocks in flight; the caller stops consuming when its byte budget
is spent, and the remaining work is cancelled. On a cluster (`address`) every node must see the source paths.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
from tokenizers import Tokenizer

from rung.errors import ConfigError, DataError
from rung.jobs.data.corpus import Part, read_part

SMALL_PARTS_PER_BLOCK = 64


@dataclass(frozen=True, slots=True)
class EncodedBlock:
    tokens: np.ndarray  # every document's ids followed by the separator, concatenated
    lengths: np.ndarray  # int64: tokens per document (separator included)
    text_bytes: np.ndarray  # int64: UTF-8 bytes of each document's text

    def documents(self) -> Iterator[tuple[int, np.ndarray]]:
        """(text bytes, ids) per document, in order."""
        ends = np.cumsum(self.lengths)
        for size, start, end in zip(self.text_bytes.tolist(), (ends - self.lengths).tolist(), ends.tolist()):
            yield size, self.tokens[start:end]


def plan_blocks(parts: list[Part]) -> list[list[Part]]:
    """Consecutive small files share a block; a Parquet row group, an Arrow file or a JSONL file is one."""
    blocks: list[list[Part]] = []
    for part in parts:
        if part.kind == "text" and blocks and blocks[-1][-1].kind == "text" \
                and len(blocks[-1]) < SMALL_PARTS_PER_BLOCK:
            blocks[-1].append(part)
        else:
            blocks.append([part])
    return blocks


def encode_block(block: list[Part], tokenizer: Tokenizer, text_field: str, separator: int,
                 dtype: np.dtype) -> EncodedBlock:
    texts = [text for part in block for text in read_part(part, text_field)]
    encodings = tokenizer.encode_batch(texts) if texts else []
    arrays = [np.array(encoding.ids + [separator], dtype=dtype) for encoding in encodings]
    return EncodedBlock(tokens=np.concatenate(arrays) if arrays else np.empty(0, dtype),
                        lengths=np.array([a.size for a in arrays], dtype=np.int64),
                        text_bytes=np.array([len(text.encode()) for text in texts], dtype=np.int64))


def encode_blocks(blocks: list[list[Part]], tokenizer: Tokenizer, text_field: str, separator: int, dtype: np.dtype,
                  workers: int = 0, address: str | None = None) -> Iterator[EncodedBlock]:
    """Every block's encoding, in order: here when `workers` is 0, else on Ray Data with that many encoders."""
    if not blocks:
        return
    if workers <= 0:
        for block in blocks:
            yield encode_block(block, tokenizer, text_field, separator, dtype)
        return
    yield from _encode_on_ray(blocks, tokenizer, text_field, separator, dtype, workers, address)


class _Encoder:
    """A Ray Data actor: one tokenizer per worker process, one block per call, on one thread — the one CPU Ray
    reserved for it (`encode_batch` would otherwise spread over every core of the node, and N actors would
    oversubscribe it). A DataError (bad record) comes back as the row's `error`, so the driver raises it with its
    message instead of a wrapped task failure."""

    def __init__(self, tokenizer_json: str, text_field: str, separator: int, dtype: str):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by the tokenizers library at every call
        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.text_field, self.separator, self.dtype = text_field, separator, np.dtype(dtype)

    def __call__(self, batch: dict) -> dict:
        (block_json,) = batch["block"]
        block = [Part(**part) for part in json.loads(block_json)]
        try:
            encoded = encode_block(block, self.tokenizer, self.text_field, self.separator, self.dtype)
        except DataError as err:
            return {"tokens": [b""], "lengths": [b""], "text_bytes": [b""], "error": [str(err)]}
        return {"tokens": [encoded.tokens.tobytes()], "lengths": [encoded.lengths.tobytes()],
                "text_bytes": [encoded.text_bytes.tobytes()], "error": [""]}


def connect_ray(workers: int, address: str | None) -> None:
    """Join (or start) the Ray cluster and check it can hold `workers` encoders: before any work, so a wrong
    address or too small a cluster fails in seconds."""
    from rung.platform import cluster

    handle = cluster.connect(address)
    if workers > handle.cpus:
        raise ConfigError("--workers", f"{workers} encoders need {workers} CPUs; the Ray cluster has "
                          f"{handle.cpus:g}")


def _encode_on_ray(blocks: list[list[Part]], tokenizer: Tokenizer, text_field: str, separator: int,
                   dtype: np.dtype, workers: int, address: str | None) -> Iterator[EncodedBlock]:
    connect_ray(workers, address)
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # rung prints its own progress
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    items = [{"block": json.dumps([asdict(part) for part in block])} for block in blocks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _Encoder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1,
        fn_constructor_kwargs={"tokenizer_json": tokenizer.to_str(), "text_field": text_field,
                               "separator": separator, "dtype": np.dtype(dtype).name})
    for row in dataset.iter_rows():
        if row["error"]:
            raise DataError(row["error"])
        yield EncodedBlock(tokens=np.frombuffer(row["tokens"], dtype=dtype),
                           lengths=np.frombuffer(row["lengths"], dtype=np.int64),
                           text_bytes=np.frombuffer(row["text_bytes"], dtype=np.int64))
