"""Tokenization throughput (`make bench`): `rung data prepare` in one process and on Ray Data with 1 and 2 workers,
against the `tokenizers` library's own `encode_batch` over the same documents in one process.

The corpus is the built-in one (the Python standard library's source) written as Parquet shards of 256 documents a
row group, the shape of a FineWeb-style corpus; the tokenizer is a byte-level BPE trained once beforehand and given
as `data.tokenizer`, so every rung figure is reading + encoding + writing shards, and the baseline is encoding
alone, from texts already in memory. Ray is started once before the rounds (its start-up is reported apart); the
configurations alternate within each round and the medians are reported. `encode_batch` and rung's one-process
path use the library's default threading (every core); a Ray Data worker encodes on one thread, the one CPU Ray
reserves for it. Writes OUT/tokenize_throughput.json and OUT/tokenize_throughput.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rung.jobs.config import DataConfig  # noqa: E402
from rung.jobs.data.corpus import plan_parts, read_part, resolve_sources  # noqa: E402
from rung.jobs.data.shards import prepare, within_budget  # noqa: E402
from rung.jobs.data.tokenizer import train_bpe  # noqa: E402

CONFIGS = ["encode_batch (1 process)", "rung, 1 process", "rung, Ray Data 1 worker", "rung, Ray Data 2 workers"]


def write_corpus(root: Path, max_bytes: int) -> tuple[list[str], list[str]]:
    """(Parquet files, the documents in them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = (t for part in plan_parts(resolve_sources([]), "text") for t in read_part(part, "text"))
    documents = list(within_budget(((len(t.encode()), t) for t in texts), max_bytes))
    files = []
    per_file = -(-len(documents) // 4)
    for index in range(4):
        path = root / f"part-{index:02d}.parquet"
        pq.write_table(pa.table({"text": documents[index * per_file:(index + 1) * per_file]}), path,
                       row_group_size=256)
        files.append(str(path))
    return files, documents


def timed_prepare(cfg: DataConfig, workers: int) -> tuple[float, int]:
    shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    started = time.perf_counter()
    data = prepare(cfg, log=lambda _line: None, workers=workers)
    seconds = time.perf_counter() - started
    return seconds, data.num_tokens + data.validation["num_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--mb", type=float, default=24.0, help="megabytes of text (the built-in corpus has ~30)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="rung-tokenize-"))
    try:
        files, documents = write_corpus(work, int(args.mb * 1e6))
        tokenizer = train_bpe(documents[: max(len(documents) // 8, 1)], 8192)
        (work / "tok").mkdir()
        tokenizer.save(str(work / "tok" / "tokenizer.json"))
        cfg = DataConfig(sources=files, tokenizer=str(work / "tok"), max_bytes=None, cache_dir=str(work / "cache"))
        from rung.jobs.data.encoding import connect_ray

        started = time.perf_counter()
        connect_ray(2, None)
        ray_start = time.perf_counter() - started
        timed_prepare(cfg, 2)  # warm-up: actors' imports, the file cache
        seconds: dict[str, list[float]] = {name: [] for name in CONFIGS}
        tokens = 0
        for round_ in range(args.rounds):
            for name in CONFIGS:
                if name.startswith("encode_batch"):
                    began = time.perf_counter()
                    encoded = tokenizer.encode_batch(documents)
                    seconds[name].append(time.perf_counter() - began)
                    tokens = sum(len(e.ids) for e in encoded) + len(encoded)  # + one separator each, as rung
                else:
                    workers = 0 if "1 process" in name else int(name.split("Data ")[1].split()[0])
                    took, counted = timed_prepare(cfg, workers)
                    seconds[name].append(took)
                    assert counted == tokens, (name, counted, tokens)
                print(f"round {round_ + 1}/{args.rounds} {name}: {tokens / seconds[name][-1]:,.0f} tokens/s",
                      flush=True)
        rates = {name: tokens / statistics.median(values) for name, values in seconds.items()}
        baseline = rates[CONFIGS[0]]
        result = {"machine": f"{os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"), "text_mb": args.mb,
                  "documents": len(documents), "tokens": tokens, "ray_start_seconds": ray_start,
                  "seconds": seconds, "tokens_per_second": rates,
                  "ratio_to_encode_batch": {name: rate / baseline for name, rate in rates.items()}}
        (out / "tokenize_throughput.json").write_text(json.dumps(result, indent=2))
        plot(rates, out / "tokenize_throughput.png")
        for name in CONFIGS:
            print(f"{name}: {rates[name]:,.0f} tokens/s ({rates[name] / baseline:.2f}x encode_batch)")
        print(f"Ray start-up (once): {ray_start:.1f} s; wrote {out}/tokenize_throughput.json and .png")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def plot(rates: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = list(rates)
    ax.barh(names[::-1], [rates[n] / 1e6 for n in names[::-1]], color=["#4c72b0"] * 3 + ["#999999"])
    ax.set_xlabel("million tokens per second (median)")
    ax.set_title("Tokenization throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
