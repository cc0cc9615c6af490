"""Step-time overhead of the matrix optimizers: `rung train` (one worker, ZeRO-0 fp32) with Muon, Shampoo, SOAP or
K-FAC on the hidden matrices against AdamW on the same model, batches and thread count, across widths; measured
alternately in one run (every repeat trains each optimizer once per width), medians of the repeats.

The ratio is AdamW's tokens/s over the optimizer's: how much longer a step takes. Shampoo's, SOAP's and
K-FAC's eigendecompositions run every `train.precondition_every` steps (default 10), so the measured steps include their
share.

Writes OUT/optimizer_overhead.json and OUT/optimizer_overhead.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rung.config import evolve  # noqa: E402
from rung.jobs.experiments.shapes import reshape  # noqa: E402
from rung.jobs.loading import load_run_config  # noqa: E402
from rung.jobs.train.loop import train  # noqa: E402

WARMUP = 5  # steps left out of every rate
OPTIMIZERS = ("adamw", "muon", "shampoo", "soap", "kfac")


def tokens_per_second(cfg) -> float:
    rows = train(cfg, log=lambda _: None)[WARMUP:]
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--widths", default="128,256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    widths = [int(w) for w in args.widths.split(",")]
    base = load_run_config("tiny", [f"out_dir={out / 'optimizer_overhead_runs'}", f"train.steps={args.steps}",
                                    "train.warmup_steps=2", "train.eval_every=0", "train.keep_checkpoints=0"])
    rates: dict[str, dict[int, list[float]]] = {name: {w: [] for w in widths} for name in OPTIMIZERS}
    started, total = time.perf_counter(), args.repeats * len(widths) * len(OPTIMIZERS)
    for repeat in range(args.repeats):
        for width in widths:
            for name in OPTIMIZERS:
                cfg = evolve(reshape(base, width=width, base_width=base.model.d_model),
                             {"train.optimizer": name, "name": f"{name}-w{width}"})
                rates[name][width].append(tokens_per_second(cfg))
                done = sum(len(v) for per in rates.values() for v in per.values())
                elapsed = time.perf_counter() - started
                print(f"overhead: {done}/{total} {name} width {width}: {rates[name][width][-1]:,.0f} tokens/s | "
                      f"elapsed {elapsed:.0f} s, eta {elapsed / done * (total - done):.0f} s", flush=True)
    medians = {name: {w: statistics.median(v) for w, v in per.items()} for name, per in rates.items()}
    ratios = {name: {w: medians["adamw"][w] / medians[name][w] for w in widths} for name in OPTIMIZERS[1:]}
    record = {"machine": platform.processor() or platform.machine(), "threads": os.environ["OMP_NUM_THREADS"],
              "steps": args.steps, "warmup_excluded": WARMUP, "repeats": args.repeats,
              "tokens_per_second_median": medians, "step_time_over_adamw": ratios,
              "worst": {name: max(per.values()) for name, per in ratios.items()}}
    (out / "optimizer_overhead.json").write_text(json.dumps(record, indent=2))
    figure, axis = plt.subplots(figsize=(5, 3.5))
    for name, per in ratios.items():
        axis.plot(widths, [per[w] for w in widths], marker="o", label=name)
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set(xscale="log", xlabel="width (d_model)", ylabel="step time / AdamW's", title="optimizer overhead")
    axis.set_xticks(widths, [str(w) for w in widths])
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "optimizer_overhead.png", dpi=120)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
