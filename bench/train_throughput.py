"""Training throughput: `rung train` (one worker, DeepSpeed ZeRO-0) vs a plain PyTorch loop on the same model,
batches, AdamW groups and thread count, measured alternately in one run; and the latency Ray adds to a run.

Writes OUT/train_throughput.json and OUT/train_throughput.png. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from rung.jobs.data.loader import SequenceLoader  # noqa: E402
from rung.jobs.data.prepare import prepare_data  # noqa: E402
from rung.jobs.loading import load_run_config  # noqa: E402
from rung.jobs.model.build import build_model  # noqa: E402
from rung.jobs.model.transformer import language_model_loss  # noqa: E402
from rung.jobs.train.loop import train  # noqa: E402
from rung.jobs.train.schedule import lr_factor  # noqa: E402
from rung.platform import runtime  # noqa: E402

WARMUP = 5  # steps left out of every rate


def plain_pytorch(cfg) -> float:
    """The same training step with no DeepSpeed: tokens/s over the steps after warm-up."""
    model, param = build_model(cfg)
    optimizer = torch.optim.AdamW(param.param_groups(model, cfg.train.lr, cfg.train.weight_decay,
                                                     cfg.train.adam_eps), betas=cfg.train.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg.train))
    loader = SequenceLoader(prepare_data(cfg, log=lambda _: None), cfg.train.seq_len, cfg.train.global_batch,
                            cfg.train.seed)
    micro = cfg.train.micro_batch
    accumulation = cfg.train.global_batch // micro
    seconds, tokens = 0.0, 0
    for step in range(cfg.train.steps):
        started = time.perf_counter()
        inputs, targets = loader.batch(step)
        for index in range(accumulation):
            rows = slice(index * micro, (index + 1) * micro)
            loss, _ = language_model_loss(model(inputs[rows]), targets[rows])
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            seconds += time.perf_counter() - started
            tokens += inputs.numel()
    return tokens / seconds


def rung_train(cfg) -> float:
    rows = train(cfg, log=lambda _: None)[WARMUP:]
    return sum(r["tokens"] for r in rows) / sum(r["seconds"] for r in rows)


def wall_time(args: list[str]) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rung.cli", *args], check=True, capture_output=True, env=env,
                   timeout=600)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["train", "tiny", "--set", "train.steps=1", "--set", "train.warmup_steps=0"]
    one = [wall_time([*common, "--set", f"out_dir={out}/runs", "--set", f"name=w1-{i}-{time.time_ns()}"])
           for i in range(2)]
    two = [wall_time([*common, "--workers", "2", "--set", f"out_dir={out}/runs", "--set",
                      f"name=w2-{i}-{time.time_ns()}"]) for i in range(2)]
    runtime.configure_process()
    runtime.init_process_group(0, 1, 0, runtime.file_rendezvous())
    rates: dict[str, list[float]] = {"plain PyTorch": [], "rung (DeepSpeed ZeRO-0)": []}
    for repeat in range(args.repeats):  # alternate, so drift in machine speed hits both alike
        cfg = load_run_config("tiny", [f"train.steps={args.steps}", "train.warmup_steps=5",
                                       f"out_dir={out}/runs", f"name=bench-{repeat}-{time.time_ns()}"])
        rates["plain PyTorch"].append(plain_pytorch(cfg))
        rates["rung (DeepSpeed ZeRO-0)"].append(rung_train(cfg))
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in rates.items()))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    ratio = medians["rung (DeepSpeed ZeRO-0)"] / medians["plain PyTorch"]
    record = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "model": "tiny preset (362,816 params), seq 128, global batch 16, micro 8", "steps": args.steps,
              "tokens_per_second": rates, "median_tokens_per_second": medians, "rung_over_plain": ratio,
              "one_step_wall_seconds": {"1 worker in-process": statistics.median(one),
                                        "2 Ray workers (embedded cluster)": statistics.median(two)}}
    (out / "train_throughput.json").write_text(json.dumps(record, indent=2))
    _plot(record, out / "train_throughput.png")
    print(json.dumps({k: record[k] for k in ("median_tokens_per_second", "rung_over_plain",
                                             "one_step_wall_seconds")}, indent=2))


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(record["median_tokens_per_second"])
    left.bar(names, [record["median_tokens_per_second"][n] for n in names], color=["#999", "#3a7"])
    left.set_ylabel("tokens/s (median)")
    left.set_title(f"training throughput: rung / plain = {record['rung_over_plain']:.2f}x")
    walls = record["one_step_wall_seconds"]
    right.bar(list(walls), list(walls.values()), color=["#999", "#37a"])
    right.set_ylabel("seconds")
    right.set_title("wall time of a 1-step run (start-up included)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
