"""The nano-batch autotuner (`rung serve MODEL_DIR --tune`): times the model's forward pass on synthetic steps of
increasing token counts for each candidate split, and stores the split with the lowest total time, per device and
model, as JSON (with a PNG of the profile) under ~/.cache/rung/tune/ — where `rung serve` looks first.

Splitting pays where one nano-batch's attention can run beside another's GEMMs (CUDA streams); on a CPU the parts
run one after another, so the tuner measures what the extra, smaller GEMMs cost and usually keeps one part.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from rung.platform.paths import cache_dir
from rung.serving.config import EngineConfig
from rung.serving.worker.runner import ModelRunner
from rung.serving.worker.step import StepInputs

CANDIDATES = (1, 2, 3, 4)


def default_nano_batches(device: torch.device) -> int:
    """Untuned: overlap two nano-batches on a GPU; one batch on a CPU, where the parts cannot overlap."""
    return 2 if device.type == "cuda" else 1


def device_key(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "-")
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores-{torch.get_num_threads()}threads"


def tune_path(model_dir: str | Path, device: torch.device) -> Path:
    config = (Path(model_dir) / "config.json").read_bytes()
    model = hashlib.sha256(config).hexdigest()[:12]
    return cache_dir("tune") / f"{device_key(device)}-{Path(model_dir).resolve().name}-{model}.json"


def tuned_nano_batches(model_dir: str | Path, device: torch.device) -> int | None:
    if not (Path(model_dir) / "config.json").is_file():
        return None  # not a model folder: loading it says so
    path = tune_path(model_dir, device)
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["nano_batches"])
    except (ValueError, KeyError):
        return None  # a damaged file is ignored (and rewritten by the next --tune)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _synthetic_step(runner: ModelRunner, num_tokens: int) -> StepInputs:
    """A step like a busy server's: decode spans of one token with 128-token contexts, plus one prefill chunk."""
    vocab, capacity = runner.model.spec.vocab_size, runner.num_slots
    decodes = max(num_tokens // 2, 1)
    prefill = num_tokens - decodes
    spans, token_ids, positions, slots, first = [], [], [], [], 0
    for index in range(decodes + (1 if prefill else 0)):
        rows, context = (1, 128) if index < decodes else (prefill, prefill)
        base = (index * 256) % max(capacity - 256, 1)
        context_slots = torch.arange(base, base + context)
        spans.append((first, rows, [slice(base, base + context)]))  # consecutive blocks, as placement gives
        token_ids.append(torch.randint(0, vocab, (rows,)))
        positions.append(torch.arange(context - rows, context))
        slots.append(context_slots[-rows:])
        first += rows
    return StepInputs(torch.cat(token_ids), torch.cat(positions), torch.cat(slots), spans).to(runner.model.device)


def tune(model_dir: str | Path, engine_config: EngineConfig, repeats: int = 5, log=print) -> dict:
    """Profile every candidate split on this device and store the best; returns the stored record."""
    runner = ModelRunner.for_folder(model_dir, engine_config)
    model = runner.model
    top = engine_config.max_num_batched_tokens
    sizes = sorted({n for n in (16, 64, 256) if n < top} | {top})
    profile: dict[str, dict[str, float]] = {}
    for num_tokens in sizes:
        step = _synthetic_step(runner, num_tokens)
        profile[str(num_tokens)] = {}
        for parts in CANDIDATES:
            model.forward(step, runner.cache, parts)  # warm-up
            times = []
            for _ in range(repeats):
                _synchronize(model.device)
                started = time.perf_counter()
                model.forward(step, runner.cache, parts)
                _synchronize(model.device)
                times.append(time.perf_counter() - started)
            profile[str(num_tokens)][str(parts)] = statistics.median(times) * 1000
        log(f"tune: {num_tokens} tokens: " + ", ".join(f"{p} part{'s' if p != '1' else ''} {ms:.2f} ms"
                                                         for p, ms in profile[str(num_tokens)].items()))
    chosen = min(CANDIDATES, key=lambda p: sum(row[str(p)] for row in profile.values()))
    result = {"device": device_key(model.device), "model": str(Path(model_dir).resolve()), "nano_batches": chosen,
              "step_ms": profile}
    path = tune_path(model_dir, model.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, path)
    _plot(profile, path.with_suffix(".png"))
    log(f"tune: {chosen} nano-batch{'es' if chosen > 1 else ''} per step; wrote {path} and {path.with_suffix('.png')}")
    return result


def _plot(profile: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [int(n) for n in profile]
    for parts in CANDIDATES:
        ax.plot(sizes, [profile[str(n)][str(parts)] for n in sizes], marker="o", label=f"{parts} nano-batches")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("forward time (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
