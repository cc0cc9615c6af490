"""Corpus formats (Parquet, Arrow IPC, JSONL.gz/.zst, `datasets` folders), parallel tokenization on Ray Data, and
bad corpora refused by name, through real files written by pyarrow, zstandard and the datasets library."""

from __future__ import annotations

import filecmp
import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rung.jobs.config import DataConfig
from rung.jobs.data.shards import MANIFEST, prepare
from tests.conftest import assert_clean_failure, run_rung
from tests.test_data import decoded_documents


def texts(kind: str, count: int) -> list[str]:
    return [f"# {kind} {i}: ünïcode ✓\ndef f_{i}(x):\n    return x * {i} + {len(kind)}\n" for i in range(count)]


def write_corpus(root: Path) -> tuple[list[str], list[str]]:
    """(sources, every document's text in corpus order): one source of each format, several Parquet row groups."""
    root.mkdir(parents=True, exist_ok=True)
    expected, sources = [], []

    def add(source: Path, documents: list[str]) -> None:
        sources.append(str(source))
        expected.extend(documents)

    docs = texts("parquet", 20)
    pq.write_table(pa.table({"id": list(range(20)), "text": docs}), root / "a.parquet", row_group_size=6)
    add(root / "a.parquet", docs)
    docs = texts("arrow-file", 5)
    with pa.ipc.new_file(root / "b.arrow", pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": docs}))
    add(root / "b.arrow", docs)
    docs = texts("arrow-stream", 5)
    with pa.ipc.new_stream(root / "c.arrow", pa.schema([("text", pa.large_string())])) as writer:
        writer.write_table(pa.table({"text": pa.array(docs, pa.large_string())}))
    add(root / "c.arrow", docs)
    docs = texts("gzip", 6)
    with gzip.open(root / "d.jsonl.gz", "wt", encoding="utf-8") as handle:
        handle.write("\n".join(json.dumps({"text": d}) for d in docs))
    add(root / "d.jsonl.gz", docs)
    import zstandard

    docs = texts("zstd", 6)
    (root / "e.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "\n".join(json.dumps({"text": d}) for d in docs).encode()))
    add(root / "e.jsonl.zst", docs)
    import datasets

    docs = texts("datasets", 8)
    datasets.Dataset.from_dict({"text": docs, "n": list(range(8))}).save_to_disk(str(root / "saved"))
    add(root / "saved", docs)
    (root / "shards").mkdir()
    first, second = texts("dir-0", 4), texts("dir-1", 4)
    pq.write_table(pa.table({"text": first}), root / "shards" / "part-0.parquet")
    pq.write_table(pa.table({"text": second}), root / "shards" / "part-1.parquet")
    add(root / "shards", first + second)
    for i in range(3):
        (root / "plain" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (root / "plain" / f"{i}.txt").write_text(texts("text", 1)[0] + f"# file {i}\n")
    add(root / "plain" / "*.txt", [texts("text", 1)[0] + f"# file {i}\n" for i in range(3)])
    return sources, expected


def test_every_format_round_trips_through_the_shards(tmp_path):
    sources, expected = write_corpus(tmp_path / "corpus")
    data = prepare(DataConfig(sources=sources, vocab_size=400, validation_fraction=0,
                              cache_dir=str(tmp_path / "cache")), log=lambda _: None)
    assert decoded_documents(data) == expected  # byte-level BPE: decode(shards) is the text itself
    assert data.manifest["num_documents"] == len(expected) and data.validation is None


def test_a_custom_text_field(tmp_path):
    pq.write_table(pa.table({"content": ["print('a')\n" * 9, "print('b')\n" * 9]}), tmp_path / "x.parquet")
    data = prepare(DataConfig(sources=[str(tmp_path / "x.parquet")], text_field="content", vocab_size=300,
                              validation_fraction=0.5, cache_dir=str(tmp_path / "cache")), log=lambda _: None)
    assert decoded_documents(data, "validation") == ["print('a')\n" * 9]
    assert decoded_documents(data) == ["print('b')\n" * 9]


def test_ray_data_tokenization_writes_the_same_bytes_as_one_process(tmp_path):
    sources, _ = write_corpus(tmp_path / "corpus")
    sets = [f"data.sources=[{','.join(sources)}]", "data.vocab_size=400", "data.validation_fraction=0.1",
            "data.shard_tokens=900"]
    outputs = []
    for name, workers in (("single", "0"), ("ray", "2")):
        args = [a for s in (*sets, f"data.cache_dir={tmp_path / name}") for a in ("--set", s)]
        result = run_rung("data", "prepare", "tiny", "--workers", workers, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "docs/s" in result.stdout and "tok/s" in result.stdout and "eta" in result.stdout
        (folder,) = (tmp_path / name).iterdir()
        outputs.append(folder)
    single, ray = outputs
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in ray.iterdir())
    assert sum(n.startswith("shard_") for n in names) > 1 and sum(n.startswith("validation_") for n in names) >= 1
    for name in names:
        if name != MANIFEST:
            assert filecmp.cmp(single / name, ray / name, shallow=False), name
    manifests = [json.loads((folder / MANIFEST).read_text()) for folder in outputs]
    for manifest in manifests:
        del manifest["config"]["cache_dir"]  # the one difference: where each was asked to go
    assert manifests[0] == manifests[1]
    assert manifests[0]["validation"]["num_documents"] == 7  # 64 documents: the 1st, 11th, ..., 61st


def parquet_without_text(root: Path) -> list[str]:
    pq.write_table(pa.table({"body": ["x"], "url": ["u"]}), root / "a.parquet")
    return [f"data.sources=[{root / 'a.parquet'}]"]


def parquet_with_numbers(root: Path) -> list[str]:
    pq.write_table(pa.table({"text": np.arange(3)}), root / "a.parquet")
    return [f"data.sources=[{root / 'a.parquet'}]"]


def corrupt_parquet(root: Path) -> list[str]:
    (root / "a.parquet").write_bytes(b"PAR1 this is not a parquet file at all")
    return [f"data.sources=[{root / 'a.parquet'}]"]


def damaged_parquet_pages(root: Path) -> list[str]:
    """A sound footer over damaged data pages: found only when the row group is read."""
    pq.write_table(pa.table({"text": [f"line {i} " * 40 for i in range(400)]}), root / "a.parquet",
                   row_group_size=100)
    data = bytearray((root / "a.parquet").read_bytes())
    for offset in range(200, 4000, 7):
        data[offset] ^= 0xFF
    (root / "a.parquet").write_bytes(bytes(data))
    return [f"data.sources=[{root / 'a.parquet'}]"]


def corrupt_zstd(root: Path) -> list[str]:
    (root / "a.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd garbage")
    return [f"data.sources=[{root / 'a.jsonl.zst'}]"]


def hub_id(_root: Path) -> list[str]:
    return ["data.sources=[HuggingFaceFW/fineweb-edu]"]


def empty_validation_sources(root: Path) -> list[str]:
    (root / "train.txt").write_text("x = 1\n" * 100)
    (root / "val.txt").write_text("")
    return [f"data.sources=[{root / 'train.txt'}]", f"data.validation_sources=[{root / 'val.txt'}]"]


def fraction_out_of_range(_root: Path) -> list[str]:
    return ["data.validation_fraction=0.7"]


def dataset_dict_folder(root: Path) -> list[str]:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(root / "dd"))
    return [f"data.sources=[{root / 'dd'}]"]


@pytest.mark.parametrize("make, needles", [
    (parquet_without_text, ["a.parquet", "'text'", "body, url"]),
    (parquet_with_numbers, ["a.parquet", "'text'", "int64"]),
    (corrupt_parquet, ["a.parquet", "not a readable Parquet file"]),
    (damaged_parquet_pages, ["a.parquet"]),
    (corrupt_zstd, ["a.jsonl.zst", "unreadable"]),
    (hub_id, ["HuggingFaceFW/fineweb-edu", "hub", "download it first"]),
    (empty_validation_sources, ["validation split is empty", "val.txt"]),
    (fraction_out_of_range, ["data.validation_fraction", "[0, 0.5]"]),
    (dataset_dict_folder, ["DatasetDict", "dd/train"]),
])
def test_bad_corpora_are_refused_by_name_and_leave_no_shards(tmp_path, make, needles):
    root = tmp_path / "in"
    root.mkdir()
    sets = make(root)
    cache = tmp_path / "cache"
    result = run_rung("data", "prepare", "tiny", *[a for s in (*sets, f"data.cache_dir={cache}")
                                                   for a in ("--set", s)])
    assert result.returncode == 2
    assert_clean_failure(result, *needles)
    assert not cache.exists() or not list(cache.iterdir()), "no shard directory, complete or half-written"
