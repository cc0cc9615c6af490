"""Data: tokenizer + shards round-trip, caching, the validation split, the deterministic loader, and bad corpora.
(Corpus formats and parallel tokenization on Ray Data: tests/test_corpora.py.)"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from rung.errors import ConfigError, DataError
from rung.jobs.config import DataConfig
from rung.jobs.data.corpus import plan_parts, read_part, resolve_sources
from rung.jobs.data.encoding import encode_block
from rung.jobs.data.loader import SequenceLoader, TokenWindows, ValidationSet
from rung.jobs.data.shards import MANIFEST, held_out, load_shards, prepare, within_budget
from rung.jobs.data.tokenizer import train_bpe
from tests.conftest import assert_clean_failure, run_rung


def decoded_documents(data, split: str = "train") -> list[str]:
    tokenizer = data.tokenizer()
    tokens = np.concatenate(load_shards(data, split))
    cuts = np.flatnonzero(tokens == data.manifest["eos_id"])
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokenizer.decode(tokens[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, cuts)]


def test_builtin_corpus_round_trips_through_shards(data_cache):
    cfg = DataConfig(cache_dir=str(data_cache), vocab_size=1024, max_bytes=400_000, shard_tokens=20_000,
                     validation_fraction=0.1)
    data = prepare(cfg, log=lambda _: None)
    assert len(data.manifest["shards"]) > 1  # small shards, to exercise the boundaries
    assert data.manifest["dtype"] == "uint16" and data.vocab_size == 1024
    texts = (text for part in plan_parts(resolve_sources([]), "text") for text in read_part(part, "text"))
    read = list(within_budget(((len(t.encode()), t) for t in texts), cfg.max_bytes))
    # byte-level BPE is lossless; the held-out documents are in the validation shards and only there
    assert decoded_documents(data) == [t for i, t in enumerate(read) if not held_out(i, 0.1)]
    assert decoded_documents(data, "validation") == [t for i, t in enumerate(read) if held_out(i, 0.1)]
    assert data.num_tokens == sum(s["num_tokens"] for s in data.manifest["shards"])
    assert data.validation["num_documents"] == sum(held_out(i, 0.1) for i in range(len(read))) >= 1


def test_text_glob_and_jsonl_sources_and_the_cache(tmp_path):
    (tmp_path / "a.txt").write_text("def hello():\n    return 'world'\n" * 50)
    (tmp_path / "b.txt").write_text("class Thing:\n    pass\n" * 50)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} ünïcode"}) for i in range(30)))
    cfg = DataConfig(sources=[str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl")], vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    lines = []
    data = prepare(cfg, log=lines.append)
    assert lines, "a fresh build reports progress"
    docs = decoded_documents(data)
    held = decoded_documents(data, "validation")  # the first document, then one in every 200 (the default)
    assert held[0].startswith("def hello") and len(held) == 1 and data.validation["num_documents"] == 1
    assert docs[0].startswith("class Thing") and docs[1] == "record 0 ünïcode"
    assert len(docs) == 1 + 30 and data.manifest["num_documents"] == 31
    again = []
    assert prepare(cfg, log=again.append).path == data.path and not again  # cached: no work, same directory
    (tmp_path / "b.txt").write_text("changed\n")
    assert prepare(cfg, log=lambda _: None).path != data.path  # a changed source is a new dataset


def test_uint32_shards_for_large_vocabularies(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    tokenizer = train_bpe(["some text"], 300)
    block = encode_block(plan_parts([tmp_path / "a.txt"], "text"), tokenizer, "text", 0, np.dtype(np.uint32))
    assert block.tokens.dtype == np.uint32 and block.tokens[-1] == 0  # the separator closes the document


def test_the_held_out_rule_takes_the_first_document_then_every_nth():
    assert [i for i in range(1000) if held_out(i, 0.005)] == [0, 200, 400, 600, 800]
    assert [i for i in range(10) if held_out(i, 0.25)] == [0, 4, 8]
    assert not any(held_out(i, 0.0) for i in range(100))


def test_window_indices_address_corpora_past_two_to_the_32_tokens():
    class Shard:  # only the size matters to the index
        def __init__(self, size: int):
            self.size = size

    first, second = 3 << 31, 1 << 33  # 6 Gi and 8 Gi tokens
    windows = TokenWindows([Shard(first), Shard(second)], seq_len=128)
    in_first = (first - 1) // 128
    assert windows.num_sequences == in_first + (second - 1) // 128 > 1 << 26
    assert windows.location(in_first - 1) == (0, (in_first - 1) * 128)
    assert windows.location(in_first) == (1, 0)
    shard, start = windows.location(windows.num_sequences - 1)
    assert shard == 1 and start > 1 << 32 and start + 129 <= second


def test_no_validation_text_reaches_any_training_batch(tmp_path):
    """Documents marked doc-NNNN; every tenth held out. Over a whole epoch on two ranks, the training windows carry
    every training document and no held-out one; the validation set only held-out ones."""
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    lines = [json.dumps({"text": "".join(f"doc-{i:04d} {words[(i + j) % 8]} {j}\n" for j in range(12))})
             for i in range(60)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    data = prepare(DataConfig(sources=[str(tmp_path / "docs.jsonl")], vocab_size=300, validation_fraction=0.1,
                              cache_dir=str(tmp_path / "cache")), log=lambda _: None)
    held = {i for i in range(60) if i % 10 == 0}
    tokenizer = data.tokenizer()

    def ids_in(tokens) -> set[int]:
        return {int(m) for m in re.findall(r"doc-(\d{4})", tokenizer.decode(tokens.tolist()))}

    loader = SequenceLoader(data, seq_len=32, global_batch=4, seed=0)
    seen: set[int] = set()
    for step in range(loader.num_sequences // loader.global_batch):
        for rank in range(2):
            for window in loader.batch(step, rank, 2)[0]:
                seen |= ids_in(window)
    assert seen == set(range(60)) - held
    validation = ValidationSet(data, seq_len=32, global_batch=4, batches=100, seed=0)
    scored: set[int] = set()
    rows = []
    for rank in range(2):
        batches = list(validation.rank_batches(rank, 2, 3))
        rows.append(sum(len(weights) for *_, weights in batches))
        for inputs, _targets, weights in batches:
            scored |= set().union(*(ids_in(w) for w, weight in zip(inputs, weights) if weight))
    assert scored == held
    assert rows[0] == rows[1]  # both ranks run as many forwards (ZeRO-3 and expert parallelism need it)
    weighted = sum(float(w.sum()) for rank in range(2) for *_, w in validation.rank_batches(rank, 2, 3))
    assert weighted == validation.ids.size == validation.num_sequences  # each window scored exactly once


@pytest.fixture(scope="module")
def builtin_data(data_cache):
    return prepare(DataConfig(cache_dir=str(data_cache), vocab_size=1024, max_bytes=400_000, shard_tokens=20_000),
                   log=lambda _: None)


@pytest.fixture(scope="module")
def loader(builtin_data) -> SequenceLoader:
    return SequenceLoader(builtin_data, seq_len=32, global_batch=8, seed=3)


def test_loader_is_deterministic_and_resumes_exactly(loader, builtin_data):
    other = SequenceLoader(builtin_data, 32, 8, seed=3)  # a fresh process's loader, as after a restart
    for step in (0, 5, 1000):
        a, b = loader.batch(step), other.batch(step)
        assert a[0].equal(b[0]) and a[1].equal(b[1])
    inputs, targets = loader.batch(7)
    assert inputs.shape == (8, 32) and inputs[:, 1:].equal(targets[:, :-1])  # targets are inputs shifted by one
    # Resuming at step s yields what an uninterrupted run sees at step s: the batch is a function of the step.
    run = [loader.sequence_ids(s, 0, 1) for s in range(20)]
    resumed = [other.sequence_ids(s, 0, 1) for s in range(10, 20)]
    assert all(np.array_equal(a, b) for a, b in zip(run[10:], resumed))


def test_an_epoch_visits_every_sequence_once_and_ranks_never_overlap(loader):
    world = 2
    steps_per_epoch = loader.num_sequences // loader.global_batch
    seen = []
    for step in range(steps_per_epoch):
        ranks = [set(loader.sequence_ids(step, r, world).tolist()) for r in range(world)]
        assert not ranks[0] & ranks[1]
        seen.extend(ranks[0] | ranks[1])
    assert len(seen) == len(set(seen)) == steps_per_epoch * loader.global_batch  # nothing repeated or skipped
    # The same global order regardless of the number of workers.
    one = np.concatenate([loader.sequence_ids(4, 0, 1)])
    two = np.concatenate([loader.sequence_ids(4, r, 2) for r in range(2)])
    assert np.array_equal(one, two)


def test_missing_source_is_named(tmp_path):
    with pytest.raises(DataError, match="nowhere.txt"):
        prepare(DataConfig(sources=[str(tmp_path / "nowhere.txt")], cache_dir=str(tmp_path)))
    result = run_rung("data", "prepare", "tiny", "--set", f"data.sources=[{tmp_path}/nowhere/*.txt]",
                      "--set", f"data.cache_dir={tmp_path}/cache")
    assert_clean_failure(result, "nowhere/*.txt")


def test_empty_corpus_leaves_nothing_that_looks_complete(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    cache = tmp_path / "cache"
    result = run_rung("data", "prepare", "tiny", "--set", f"data.sources=[{tmp_path}/empty.txt]",
                      "--set", f"data.cache_dir={cache}")
    assert_clean_failure(result, "empty")
    assert not list(cache.glob("*")), "no shard directory, complete or half-written, may remain"


def test_bad_jsonl_record_is_located(tmp_path):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"c.jsonl:2"):
        prepare(DataConfig(sources=[str(tmp_path / "c.jsonl")], cache_dir=str(tmp_path / "cache")))
    assert not list((tmp_path / "cache").glob("*"))


def test_tokenizer_that_does_not_fit_the_model(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    train_bpe(["def f(x):\n    return x\n" * 100], 600).save(str(folder / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("print('hi')\n" * 20)
    result = run_rung("data", "prepare", "tiny", "--set", f"data.sources=[{tmp_path}/a.txt]",
                      "--set", f"data.tokenizer={folder}", "--set", "model.vocab_size=262",
                      "--set", "data.vocab_size=262", "--set", f"data.cache_dir={tmp_path}/cache",
                      "--set", "data.validation_fraction=0")  # one document: nothing to hold out
    assert_clean_failure(result, "model.vocab_size", "tokenizer")
    result = run_rung("data", "prepare", "tiny", "--set", f"data.tokenizer={tmp_path}/missing",
                      "--set", f"data.cache_dir={tmp_path}/cache")
    assert_clean_failure(result, "tokenizer.json")


def test_too_small_corpus_for_one_batch(tmp_path):
    (tmp_path / "a.txt").write_text("x = 1\n")
    data = prepare(DataConfig(sources=[str(tmp_path / "a.txt")], vocab_size=300, cache_dir=str(tmp_path / "c"),
                              validation_fraction=0), log=lambda _: None)
    with pytest.raises(ConfigError, match="train.global_batch"):
        SequenceLoader(data, seq_len=64, global_batch=8, seed=0)
    assert (data.path / MANIFEST).is_file()


def test_a_validation_split_shorter_than_one_sequence_is_named(tmp_path):
    (tmp_path / "a.txt").write_text("x = 1\n")
    (tmp_path / "b.txt").write_text("def f(y):\n    return y\n" * 200)
    data = prepare(DataConfig(sources=[str(tmp_path / "*.txt")], vocab_size=300, cache_dir=str(tmp_path / "c")),
                   log=lambda _: None)
    with pytest.raises(ConfigError, match="data.validation_fraction.*fewer than one sequence"):
        ValidationSet(data, seq_len=64, global_batch=8, batches=1, seed=0)
