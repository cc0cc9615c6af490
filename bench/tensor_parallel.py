"""Tensor-parallel serving on this CPU (`make bench`): decode output tokens/s at concurrency 32 with the model split
over two processes (gloo between them) against one process, and NanoFlow's overlap of the all-reduces on and off.

Configurations, alternated within each repeat (the median of the repeats):
- tp1:               one process, one thread (the machine's rule: one torch thread per process)
- tp1-2threads:      one process with two threads — the same two cores as TP=2, the fair baseline here
- tp2:               two processes, one nano-batch per step (every all-reduce waited for at once)
- tp2-nb2-overlap:   two nano-batches per step, one's all-reduce running while the other computes
- tp2-nb2-serial:    two nano-batches, each all-reduce waited for at once (--no-overlap-collectives)

Decode is measured as in bench/quantization.py: 32 requests of 32-token prompts prefilled (not timed), then every
decode step timed. Shapes: a GEMM-bound decoder (1024 wide, FFN 4096) and two of the serving matrix (one with a
single KV head, replicated on both ranks; one MoE). Random weights: the speed does not depend on them. Two cores
bound the gain, and gloo's all-reduce over loopback costs ~2 ms for a 32 x 1024 fp32 tensor here. Writes
OUT/tensor_parallel.json and OUT/tensor_parallel.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from quantization import CONCURRENCY, PROMPT, decode_tokens_per_s  # noqa: E402
from serve_matrix import SHAPES, make_folder  # noqa: E402

from rung.serving.config import EngineConfig  # noqa: E402

GEMM_BOUND = ("Llama", dict(vocab_size=8192, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                            num_attention_heads=16, num_key_value_heads=4))
CONFIGS: dict[str, tuple[int, dict]] = {  # name: (torch threads of the measuring process, engine settings)
    "tp1": (1, {}),
    "tp1-2threads": (2, {}),
    "tp2": (1, {"tensor_parallel_size": 2, "nano_batches": 1}),
    "tp2-nb2-overlap": (1, {"tensor_parallel_size": 2, "nano_batches": 2}),
    "tp2-nb2-serial": (1, {"tensor_parallel_size": 2, "nano_batches": 2, "overlap_collectives": False}),
}


def gemm_bound_folder(root: Path) -> Path:
    import transformers

    folder = root / "d1024-ffn4096-l8"
    if not (folder / "config.json").is_file():
        family, config = GEMM_BOUND
        torch.manual_seed(0)
        model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(
            **config, max_position_embeddings=4096))
        model.save_pretrained(folder)
    return folder


def measure(folder: Path, vocab: int, repeats: int) -> dict:
    speeds: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(repeats):
        for name, (threads, settings) in CONFIGS.items():
            torch.set_num_threads(threads)
            config = EngineConfig(max_num_seqs=CONCURRENCY, max_num_batched_tokens=4096, **settings)
            speeds[name].append(decode_tokens_per_s(folder, config, vocab))
            torch.set_num_threads(1)
    base = statistics.median(speeds["tp1"])
    return {name: {"decode_tokens_per_s": statistics.median(runs), "runs": runs,
                   "vs_tp1": statistics.median(runs) / base} for name, runs in speeds.items()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(results["shapes"])
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(CONFIGS)
    for index, name in enumerate(CONFIGS):
        ax.bar([s + index * width for s in range(len(shapes))],
               [results["shapes"][shape][name]["vs_tp1"] for shape in shapes], width, label=name)
    ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))], shapes, fontsize=8)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_title(f"decode tokens/s at concurrency {CONCURRENCY}, ÷ one process with one thread (2-core CPU, gloo)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="hd64-gqa8-v32k-l12,moe8x2-hd64-gqa4-v8k-l4",
                        help="serving-matrix shapes besides the GEMM-bound one (comma-separated)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folders = {"d1024-ffn4096-l8": (gemm_bound_folder(out / "models"), GEMM_BOUND[1]["vocab_size"])}
    folders.update({name: (make_folder(out / "models", name), SHAPES[name][1]["vocab_size"])
                    for name in args.shapes.split(",") if name})
    results = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d"), "cores": os.cpu_count(),
               "concurrency": CONCURRENCY, "prompt_tokens": PROMPT, "shapes": {}}
    for name, (folder, vocab) in folders.items():
        print(f"bench: {name}", flush=True)
        results["shapes"][name] = measure(folder, vocab, args.repeats)
        for config, row in results["shapes"][name].items():
            print(f"  {config}: {row['decode_tokens_per_s']:.1f} tokens/s, {row['vs_tp1']:.2f}x tp1", flush=True)
    (out / "tensor_parallel.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "tensor_parallel.png")
    print(f"bench: wrote {out}/tensor_parallel.json and tensor_parallel.png")


if __name__ == "__main__":
    main()
