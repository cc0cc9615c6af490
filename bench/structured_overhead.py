"""What structured outputs cost (`make bench`): rung's offline engine decoding 32 concurrent requests with a JSON
schema's token mask against the same requests unconstrained, on serving-matrix shapes from a 1k to a 32k
vocabulary, the prefix cache off so the arms' prompts cost the same. Every request samples exactly 64 tokens (ignore_eos; a grammar that completes early leaves its request
unmasked for the rest, its mask still filled each step), so both arms produce the same tokens' worth of work; the
arms alternate, three repeats, medians. The schema (an object holding an open list of short strings) stays live for
most of the 64 tokens. Goal: output tokens/s with the mask ≥ 0.9× without, in every cell. Writes
OUT/structured_overhead.json and OUT/structured_overhead.png; the worst cell is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from serve_matrix import make_folder  # noqa: E402

SHAPE_NAMES = ["hd128-mha-v1k-l4", "hd32-gqa2-v8k-l6", "hd64-gqa3-v16k-l8", "hd64-gqa8-v32k-l12"]
CONCURRENCY, PROMPT_TOKENS, OUTPUT_TOKENS, REPEATS = 32, 64, 64, 3
SCHEMA = {"type": "object", "required": ["words"],
          "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 12}}}}


def measure(llm, prompts: list[list[int]], structured) -> float:
    from rung.serving.core.params import SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=1.0, seed=0, ignore_eos=True,
                            structured=structured)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    return sum(len(c.token_ids) for completions in outputs for c in completions) / seconds


def run_shape(folder: Path) -> dict:
    from rung.serving.core.structured import StructuredOutput
    from rung.serving.engine.llm import LLM

    # no prefix cache: the arm that ran second would find the first's prompts cached
    llm = LLM(folder, max_num_seqs=CONCURRENCY, max_num_batched_tokens=4096, kv_cache_memory=1 << 30,
              enable_prefix_caching=False)
    rng = random.Random(0)
    vocab = llm.spec.vocab_size
    schema = StructuredOutput("json_schema", json.dumps(SCHEMA))
    rates: dict[str, list[float]] = {"none": [], "json_schema": []}
    measure(llm, [[rng.randrange(vocab) for _ in range(PROMPT_TOKENS)]], schema)  # warm-up: tokenizer, grammar
    for repeat in range(REPEATS):
        prompts = [[rng.randrange(vocab) for _ in range(PROMPT_TOKENS)] for _ in range(CONCURRENCY)]
        arms = ["none", "json_schema"] if repeat % 2 == 0 else ["json_schema", "none"]
        for arm in arms:
            rates[arm].append(measure(llm, prompts, schema if arm == "json_schema" else None))
    medians = {arm: statistics.median(values) for arm, values in rates.items()}
    return {"tokens_per_second": rates, "median": medians, "ratio": medians["json_schema"] / medians["none"]}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["shapes"])
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, [results["shapes"][n]["ratio"] for n in names])
    ax.axvline(0.9, color="red", linestyle="--", label="goal 0.9x")
    ax.set_xlabel(f"output tokens/s, json_schema / none (concurrency {CONCURRENCY})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--shapes", default=",".join(SHAPE_NAMES))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d"), "concurrency": CONCURRENCY, "output_tokens": OUTPUT_TOKENS,
               "schema": SCHEMA, "shapes": {}}
    for name in args.shapes.split(","):
        cell = results["shapes"][name] = run_shape(make_folder(out / "models", name))
        print(f"{name}: {cell['median']['none']:,.0f} tokens/s unconstrained, {cell['median']['json_schema']:,.0f} "
              f"with the schema's mask: {cell['ratio']:.2f}x", flush=True)
        (out / "structured_overhead.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "structured_overhead.png")
    worst = min(results["shapes"], key=lambda n: results["shapes"][n]["ratio"])
    print(f"worst cell: {worst} {results['shapes'][worst]['ratio']:.2f}x (goal 0.9x)")


if __name__ == "__main__":
    main()
