"""The prepared GPU training check (issue: training at GPU scale): rung's own training step — the DeepSpeed engine
`rung train` builds, `train_step` with its divergence guard — on a ~1.3B-parameter model (`gpt-1.3b`, bf16,
sequence 2,048) for a few dozen steps under ZeRO-0, ZeRO-2 and ZeRO-3, with and without activation checkpointing
and compiled blocks. Per variant: tokens/s, MFU (counted FLOPs over the card's datasheet bf16 peak), step time and
peak allocated memory beside the planner's prediction (`rung plan`'s memory model). Writes OUT/gpu_train.json and
OUT/gpu_train.png; sized to finish in under 8 minutes on one H100/H200. Batches are random tokens: throughput, not learning, is measured.

On the lent device machine (torch and Triton present; DeepSpeed, hjson and pydantic not), carry their wheels —
`pip download --no-deps -d .whl deepspeed hjson pydantic pydantic-core annotated-types typing-inspection` here (for
DeepSpeed pip builds a pure-Python wheel: `DS_BUILD_OPS=0 pip wheel --no-deps deepspeed -w .whl`) — install them
with `--target /tmp/site`, then: `PYTHONPATH=/tmp/site:. python3 bench/gpu_train.py --out $OUT`.
`--smoke` runs every variant of the tiny preset on a CPU in seconds, to check the plumbing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from rung.jobs.loading import load_run_config  # noqa: E402
from rung.jobs.model.counting import count  # noqa: E402
from rung.jobs.planning.memory import estimate  # noqa: E402
from rung.jobs.train.deepspeed_engine import build_engine, rung_clips  # noqa: E402
from rung.jobs.train.guard import DivergenceGuard  # noqa: E402
from rung.jobs.train.step import train_step  # noqa: E402
from rung.platform import runtime  # noqa: E402

# name -> overrides of the preset; ZeRO-3 with checkpointing is the memory-lean end, ZeRO-0 compiled the fast one
VARIANTS = {
    "zero0": ["train.zero_stage=0"],
    "zero0 compiled": ["train.zero_stage=0", "train.compile=true"],
    "zero0 checkpointed": ["train.zero_stage=0", "train.activation_checkpointing=full"],
    "zero2": ["train.zero_stage=2"],
    "zero3": ["train.zero_stage=3"],
    "zero3 checkpointed": ["train.zero_stage=3", "train.activation_checkpointing=full"],
}


class RandomTokens:
    """Stands in for the SequenceLoader: a fixed-shape batch of random tokens for any step."""

    def __init__(self, vocab: int, global_batch: int, seq_len: int, device: torch.device):
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(vocab, (global_batch, seq_len + 1), generator=generator)
        self.inputs, self.targets = tokens[:, :-1].to(device), tokens[:, 1:].to(device)

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs, self.targets


def run_variant(preset: str, overrides: list[str], warmup: int, steps: int) -> dict:
    cfg = load_run_config(preset, [*overrides, f"train.steps={warmup + steps}", "train.warmup_steps=1",
                                   "train.checkpoint_every=0"])
    engine = build_engine(cfg, world_size=1)
    loader = RandomTokens(cfg.model.vocab_size, cfg.train.global_batch, cfg.train.seq_len, engine.device)
    guard = DivergenceGuard(cfg.train, computes_norm=rung_clips(cfg))
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(engine.device)
    started = time.perf_counter()
    rows = [train_step(engine, loader, step, 0, 1, guard, cfg.train) for step in range(warmup + steps)]
    first = time.perf_counter() - started  # compile and allocator warm-up included
    timed = rows[warmup:]
    seconds = sum(r.seconds for r in timed)
    tokens = sum(r.tokens for r in timed)
    size = count(cfg.model, cfg.train.seq_len)
    result = {"overrides": overrides, "params": size.total_params, "tokens_per_step": timed[0].tokens,
              "step_seconds": seconds / len(timed), "tokens_per_second": tokens / seconds,
              "mfu": size.flops_per_token * tokens / seconds / runtime.peak_flops(cfg.train.dtype),
              "peak_memory_gib": timed[-1].peak_memory_bytes / (1 << 30),
              "planned_memory_gib": estimate(cfg, 1).total / (1 << 30), "wall_seconds": first,
              "final_loss": timed[-1].loss}
    del engine, loader
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--preset", default="gpt-1.3b")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps per variant (compilation included)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset")
    parser.add_argument("--smoke", action="store_true", help="the tiny preset on a CPU: every variant, in seconds")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: this is the GPU check (--smoke runs its plumbing on a CPU)")
    preset, shape = ("tiny", ["train.dtype=float32", "train.global_batch=8", "train.micro_batch=4"]) if args.smoke \
        else (args.preset, ["train.global_batch=8", "train.micro_batch=4", "train.use_gpu=true"])
    warmup, steps = (1, 2) if args.smoke else (args.warmup, args.steps)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    runtime.configure_process()
    runtime.init_process_group(rank=0, world_size=1, local_rank=0, init_method=runtime.file_rendezvous())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    record = {"device": device, "torch": torch.__version__, "preset": preset, "date": time.strftime("%Y-%m-%d"),
              "sequence": load_run_config(preset).train.seq_len, "variants": {}}
    for name in names:
        result = run_variant(preset, [*shape, *VARIANTS[name]], warmup, steps)
        record["variants"][name] = result
        print(f"{name}: {result['tokens_per_second']:,.0f} tokens/s, MFU {result['mfu']:.1%}, "
              f"step {result['step_seconds']:.3f} s, peak {result['peak_memory_gib']:.1f} GiB "
              f"(planner {result['planned_memory_gib']:.1f} GiB)", flush=True)
        (out / "gpu_train.json").write_text(json.dumps(record, indent=2))
    plot(record, out / "gpu_train.png")
    print(f"wrote {out}/gpu_train.json and gpu_train.png ({device})")


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(record["variants"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.barh(names[::-1], [record["variants"][n]["mfu"] * 100 for n in names[::-1]])
    left.set_xlabel("MFU (%)")
    right.barh(names[::-1], [record["variants"][n]["peak_memory_gib"] for n in names[::-1]], color="#dd8452")
    right.set_xlabel("peak memory (GiB)")
    fig.suptitle(f"{record['preset']} training step on {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
