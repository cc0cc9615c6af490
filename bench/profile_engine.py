"""Where the engine's time goes (`make bench`): rung's offline engine on each serving-matrix shape and a workload
like each matrix cell, run once under torch's profiler, its operator time grouped into what the issue asks about —
GEMMs, prefill attention, decode attention, sampling, the layers' elementwise kernels — and what no operator
accounts for (Python: scheduling, step preparation, dispatch).

Workloads, in tokens (the matrix's are in words, about 1.3 tokens a word): `short` 64 requests of 130 prompt tokens;
`long` 8 of 1,300; `shared-prefix` 64 of one 1,040-token prefix and 60 tokens of their own (the prefix is cached
after the first); 64 output tokens each, random sampling at temperature 1 (the OpenAI default the matrix sends),
64 running sequences, 4,096 tokens per step. Writes OUT/profile_engine.json and OUT/profile_engine.png (the share of
each group per cell).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

from serve_matrix import SHAPES, make_folder  # noqa: E402

# (requests, shared prefix tokens, own prompt tokens)
WORKLOADS = {"short": (64, 0, 130), "long": (8, 0, 1300), "shared-prefix": (64, 1040, 60)}
OUTPUT_TOKENS = 64
# operator name -> group; anything else is "other operators"
GROUPS = {
    "mkldnn::_linear_pointwise": "GEMMs", "aten::mm": "GEMMs", "aten::addmm": "GEMMs", "aten::_grouped_mm": "GEMMs",
    "rung::prefill_attention": "prefill attention", "aten::bmm": "prefill attention",
    "aten::_softmax": "sampling", "aten::cumsum": "sampling", "aten::searchsorted": "sampling",
    "aten::max": "sampling", "aten::div": "sampling",
    "rung::decode_attention": "decode attention",
    "rung::write_kv": "norms, RoPE, SwiGLU, KV writes", "rung::rms_norm": "norms, RoPE, SwiGLU, KV writes",
    "rung::rotary_": "norms, RoPE, SwiGLU, KV writes", "rung::silu_and_mul": "norms, RoPE, SwiGLU, KV writes",
}
ORDER = ["GEMMs", "prefill attention", "decode attention", "sampling", "norms, RoPE, SwiGLU, KV writes",
         "other operators", "Python (no operator)"]


def profile_cell(folder: Path, workload: str, seed: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from rung.serving.core.params import SamplingParams
    from rung.serving.engine.llm import LLM

    requests, prefix_len, own = WORKLOADS[workload]
    llm = LLM(folder, max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_memory=1 << 30)
    rng = random.Random(seed)
    vocab = llm.spec.vocab_size
    prefix = [rng.randrange(vocab) for _ in range(prefix_len)]
    prompts = [prefix + [rng.randrange(vocab) for _ in range(own)] for _ in range(requests)]
    params = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=1.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up (and the prefix cached)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        llm.generate(prompts, params)
        wall = time.perf_counter() - started
    seconds = dict.fromkeys(ORDER, 0.0)
    for event in prof.key_averages():
        seconds[GROUPS.get(event.key, "other operators")] += event.self_cpu_time_total / 1e6
    profiled = sum(seconds.values())
    seconds["Python (no operator)"] = max(wall - profiled, 0.0)
    return {"wall_s": wall, "output_tokens_per_s": requests * OUTPUT_TOKENS / wall, "seconds": seconds,
            "share": {group: value / max(wall, profiled) for group, value in seconds.items()}}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [(shape, workload) for shape, row in results["shapes"].items() for workload in row]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(cells) + 1.5))
    left = [0.0] * len(cells)
    for group in ORDER:
        widths = [results["shapes"][shape][workload]["share"][group] for shape, workload in cells]
        ax.barh(range(len(cells)), widths, left=left, label=group)
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(range(len(cells)), [f"{shape} {workload}" for shape, workload in cells], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("share of the engine's time (offline, one compute thread)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of the matrix's shapes")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of the workloads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shapes, workloads = args.shapes.split(","), args.workloads.split(",")
    unknown = sorted(set(shapes) - set(SHAPES)) + sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown shape or workload: {', '.join(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d"), "shapes": {}}
    cells, started = len(shapes) * len(workloads), time.perf_counter()
    for shape in shapes:
        folder = make_folder(out / "models", shape)
        results["shapes"][shape] = {}
        for workload in workloads:
            cell = profile_cell(folder, workload, args.seed)
            results["shapes"][shape][workload] = cell
            done = sum(map(len, results["shapes"].values()))
            top = sorted(cell["share"].items(), key=lambda item: -item[1])[:3]
            print(f"profile: {shape} {workload}: {cell['output_tokens_per_s']:.0f} output tokens/s; "
                  + ", ".join(f"{group} {share:.0%}" for group, share in top)
                  + f" ({done}/{cells}, eta {(time.perf_counter() - started) / done * (cells - done):.0f} s)",
                  flush=True)
            (out / "profile_engine.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "profile_engine.png")
    print(f"profile: wrote {out}/profile_engine.json and profile_engine.png")


if __name__ == "__main__":
    main()
