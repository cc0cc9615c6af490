"""The serving matrix (`make bench`): `rung serve` against vLLM's OpenAI server (the CPU build, its own venv) over
model shapes × workloads × concurrency, so a claim holds across cells rather than on one point. Every cell sends
both servers the same fresh prompts (a seed of its own, so nothing is cached from an earlier cell), the two servers
alternating which goes first; both run with one compute thread, fp32, 64 running sequences, 4,096 tokens per step,
a 1 GiB KV pool and a 4,096-token window, and both cache prefixes (each server's default).

Shapes (random weights, made with transformers): head dims 32 (the engine benchmark's), 64 and 128; GQA 1, 2, 3, 4
and 8; vocabularies 1k–32k; 4–12 layers; a dense Llama and a routed Mixtral (8 experts, top-2). Workloads, through
`rung bench serve`: short prompts; long prompts (up to ~2k tokens); a ~1k-token system prompt shared by every
request before a distinct question; three-turn conversations, each turn resending the conversation. Per shape it
also measures an exact repeat (the same 64 prompts twice at concurrency 32: rung's prefix-cache hit rate on the
second pass, from its /metrics, and the ratio on it) and the time to first token of the shared-prefix and
multi-turn workloads with and without `--no-prefix-caching`.

Writes OUT/serve_matrix.json and OUT/serve_matrix.png (ratio rung / vLLM of output tokens/s per cell); the worst
cell is printed last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from serve_http import add_tokenizer, free_port, start  # noqa: E402

WINDOW = 4096
SHAPES: dict[str, tuple[str, dict]] = {  # name: (transformers class, config)
    "hd64-gqa3-v16k-l8": ("Llama", dict(vocab_size=16384, hidden_size=384, intermediate_size=1024,
                                        num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2)),
    "hd128-mha-v1k-l4": ("Llama", dict(vocab_size=1024, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=4)),
    "moe8x2-hd64-gqa4-v8k-l4": ("Mixtral", dict(vocab_size=8192, hidden_size=256, intermediate_size=512,
                                                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                                                num_local_experts=8, num_experts_per_tok=2)),
    "hd32-gqa2-v8k-l6": ("Llama", dict(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_hidden_layers=6,
                                       num_attention_heads=8, num_key_value_heads=4)),
    "hd64-gqa8-v32k-l12": ("Llama", dict(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=1)),
}
# `rung bench serve` flags per workload; words, not tokens (about 1.3 tokens a word with these tokenizers)
WORKLOADS: dict[str, list[str]] = {
    "short": ["--random-input-len", "96", "--random-output-len", "64"],
    "long": ["--random-input-len", "1000", "--random-output-len", "64"],
    "shared-prefix": ["--prefix-len", "800", "--random-input-len", "48", "--random-output-len", "64"],
    "multi-turn": ["--turns", "3", "--random-input-len", "96", "--random-output-len", "48"],
}
CONCURRENCY = (1, 8, 32, 64)
PREFIX_WORKLOADS, PREFIX_CONCURRENCY = ("shared-prefix", "multi-turn"), 8


# the tokenizer's only special token, <|endoftext|>, is id 0: the configs' default ids (bos 1, eos 2) are ordinary
# byte-level tokens of it, and a request would stop whenever it sampled token 2
SPECIAL_IDS = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}


def make_folder(root: Path, name: str) -> Path:
    import torch
    import transformers

    folder = root / name
    if not (folder / "config.json").is_file():
        family, config = SHAPES[name]
        torch.manual_seed(0)
        model_class = getattr(transformers, f"{family}ForCausalLM")
        config_class = getattr(transformers, f"{family}Config")
        model_class(config_class(**config, **SPECIAL_IDS, max_position_embeddings=WINDOW)).save_pretrained(folder)
    for file_name in ("config.json", "generation_config.json"):  # folders made before SPECIAL_IDS: ids fixed
        path = folder / file_name
        if path.is_file():
            data = json.loads(path.read_text())
            path.write_text(json.dumps({**data, **{k: v for k, v in SPECIAL_IDS.items() if k in data}}, indent=2))
    add_tokenizer(folder, min(8000, SHAPES[name][1]["vocab_size"]))
    return folder


def servers(folder: Path, vllm_python: str) -> dict[str, list[str]]:
    common = ["--served-model-name", "m", "--max-num-seqs", "64", "--max-num-batched-tokens", "4096",
              "--max-model-len", str(WINDOW)]
    rung = [sys.executable, "-m", "rung.cli", "serve", str(folder), *common, "--kv-cache-memory", "1"]
    return {"rung": rung, "rung --no-prefix-caching": [*rung, "--no-prefix-caching"],
            "vllm": [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), *common,
                     "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1"]}


def requests_for(workload: str, concurrency: int) -> int:
    """Prompts (conversations for multi-turn) per cell: one per slot, at least 16 requests."""
    return max(6, concurrency) if workload == "multi-turn" else max(16, concurrency)


def load(url: str, workload: str, concurrency: int, seed: int, path: Path, prompts: int | None = None) -> dict:
    result = subprocess.run([sys.executable, "-m", "rung.cli", "bench", "serve", "--base-url", f"{url}/v1",
                             "--model", "m", "--num-prompts", str(prompts or requests_for(workload, concurrency)),
                             "--max-concurrency", str(concurrency), "--seed", str(seed), *WORKLOADS[workload],
                             "--json", str(path)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"rung bench serve failed: {result.stderr[-800:] or result.stdout[-800:]}")
    summary = json.loads(path.read_text())
    return {"output_tokens_per_s": summary["output_token_throughput"], "ttft_median_ms": summary["ttft"]["median_ms"],
            "prompt_tokens": sum(r["prompt_tokens"] for r in summary["requests"]),
            "failed": summary["failed_requests"]}


def prefix_counters(url: str) -> tuple[float, float]:
    import urllib.request

    values = {}
    for line in urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode().splitlines():
        if line.startswith("rung_serve_prefix_cache_"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values["rung_serve_prefix_cache_hits_total"], values["rung_serve_prefix_cache_queries_total"]


def measure_shape(name: str, folder: Path, vllm_python: str, out: Path, workloads: list[str],
                  concurrency: list[int], seed: int, log) -> dict:
    running, urls = {}, {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    vllm_env = {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_OMP_THREADS_BIND": "0"}
    row: dict = {"cells": {}}
    try:
        for server, command in servers(folder, vllm_python).items():
            port = free_port()
            urls[server] = f"http://127.0.0.1:{port}"
            running[server] = start([*command, "--port", str(port)], urls[server],
                                    out / f"matrix-{name}-{server.split()[0]}{'-nocache' * ('--no' in server)}.log",
                                    vllm_env if server == "vllm" else env)
        cells = list(itertools.product(workloads, concurrency))
        started = time.perf_counter()
        for index, (workload, c) in enumerate(cells):
            cell_seed = seed + 1000 * index + 1  # fresh prompts: no cell reuses another's
            order = ("rung", "vllm") if index % 2 == 0 else ("vllm", "rung")
            cell = {server: load(urls[server], workload, c, cell_seed, out / f"matrix-{name}-{server}.json")
                    for server in order}
            if workload in PREFIX_WORKLOADS and c == PREFIX_CONCURRENCY:
                cell["rung --no-prefix-caching"] = load(urls["rung --no-prefix-caching"], workload, c, cell_seed,
                                                        out / f"matrix-{name}-nocache.json")
            cell["ratio"] = cell["rung"]["output_tokens_per_s"] / cell["vllm"]["output_tokens_per_s"]
            row["cells"][f"{workload} c{c}"] = cell
            elapsed = time.perf_counter() - started
            failed = {server: m["failed"] for server, m in cell.items() if server != "ratio" and m["failed"]}
            if failed:
                log(f"matrix: {name} {workload} c{c}: failed requests {failed}: see {out}/matrix-{name}-*.json")
            log(f"matrix: {name} {workload} c{c}: rung {cell['rung']['output_tokens_per_s']:.0f}, vLLM "
                f"{cell['vllm']['output_tokens_per_s']:.0f} output tokens/s, ratio {cell['ratio']:.2f} "
                f"({index + 1}/{len(cells)}, eta {elapsed / (index + 1) * (len(cells) - index - 1):.0f} s)")
        repeat_seed = seed + 999_999
        first = {server: load(urls[server], "short", 32, repeat_seed, out / f"matrix-{name}-{server}.json", 64)
                 for server in ("rung", "vllm")}
        hits, queries = prefix_counters(urls["rung"])
        second = {server: load(urls[server], "short", 32, repeat_seed, out / f"matrix-{name}-{server}.json", 64)
                  for server in ("vllm", "rung")}
        hits2, queries2 = prefix_counters(urls["rung"])
        row["repeat"] = {"first": first, "second": second, "hit_rate": (hits2 - hits) / max(queries2 - queries, 1),
                         "ratio_first": first["rung"]["output_tokens_per_s"] / first["vllm"]["output_tokens_per_s"],
                         "ratio_second": second["rung"]["output_tokens_per_s"]
                         / second["vllm"]["output_tokens_per_s"]}
        log(f"matrix: {name} exact repeat: rung's hit rate {row['repeat']['hit_rate']:.1%}, ratio "
            f"{row['repeat']['ratio_first']:.2f} first pass, {row['repeat']['ratio_second']:.2f} second")
    finally:
        for process in running.values():
            process.terminate()
            process.wait(60)
    return row


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shapes = [s for s in results["shapes"] if "cells" in results["shapes"][s]]
    columns = list(results["shapes"][shapes[0]]["cells"])
    grid = np.array([[results["shapes"][s]["cells"].get(c, {}).get("ratio", np.nan) for c in columns]
                     for s in shapes])
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(columns), 1.6 + 0.5 * len(shapes)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.5, vmax=1.5)
    for (i, j), value in np.ndenumerate(grid):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(shapes)), shapes, fontsize=7)
    ax.set_title("rung serve / vLLM (CPU), output tokens/s", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of the shapes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of the workloads")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCY)), help="comma-separated levels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes, workloads = args.shapes.split(","), args.workloads.split(",")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    unknown = sorted(set(shapes) - set(SHAPES)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown shape or workload: {', '.join(unknown)}")
    if not Path(args.vllm_python).exists():
        print(f"matrix: {args.vllm_python} not found (make bench-vllm-venv): nothing to compare against", flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d"), "shapes": {}}
    for name in shapes:
        try:
            results["shapes"][name] = measure_shape(name, make_folder(out / "models", name), args.vllm_python,
                                                    out, workloads, concurrency, args.seed, print)
        except RuntimeError as err:
            results["shapes"][name] = {"error": str(err)[-1500:]}
            print(f"matrix: {name}: {str(err)[-300:]}", flush=True)
        (out / "serve_matrix.json").write_text(json.dumps(results, indent=2))
    cells = [(row["cells"][cell]["ratio"], name, cell) for name, row in results["shapes"].items()
             for cell in row.get("cells", {})]
    if not cells:
        return
    plot(results, out / "serve_matrix.png")
    ratio, name, cell = min(cells)
    results["worst_cell"] = {"shape": name, "cell": cell, "ratio": ratio}
    (out / "serve_matrix.json").write_text(json.dumps(results, indent=2))
    print(f"matrix: wrote {out}/serve_matrix.json and serve_matrix.png; {sum(r >= 1 for r, _, _ in cells)} of "
          f"{len(cells)} cells at >= 1.0x vLLM")
    print(f"matrix: worst cell: {name} {cell}: {ratio:.2f}x vLLM")


if __name__ == "__main__":
    main()
