"""Coordinate check: does activation size stay flat as the model grows? The test that the scaling rules are right.

For each parametrization and each width (or depth), train a few steps at a deliberately large LR and record the
mean |activation| of the embedding output, the attention and FFN outputs (averaged over layers), the final residual
stream and the logits. Under μP these stay flat in width and under CompleteP flat in depth; under SP they grow.
The slope of log2(activation) against log2(size) at the last step summarises each curve.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from rung.config import evolve
from rung.jobs.config import RunConfig
from rung.jobs.data.loader import SequenceLoader
from rung.jobs.data.prepare import prepare_data
from rung.jobs.experiments.shapes import reshape
from rung.jobs.model.build import build_model
from rung.jobs.model.transformer import Transformer, language_model_loss
from rung.platform.progress import Progress
from rung.jobs.train.optimizers import build_optimizer, damping
from rung.platform import runtime

MODULES = ("embedding", "attention", "ffn", "residual", "logits")


def shape_config(base: RunConfig, param: str, axis: str, size: int, smallest: int) -> RunConfig:
    """The base config at one width or depth, the smallest size being the base shape.

    The readout is zero-initialised, as the μP authors prescribe for coordinate checks: a random readout adds
    init-time noise that dominates the smallest widths and hides the trend being measured."""
    if axis == "width":
        cfg = reshape(base, width=size, base_width=smallest, base_depth=base.model.n_layers)
    else:
        cfg = reshape(base, depth=size, base_width=base.model.d_model, base_depth=smallest)
    return evolve(cfg, {"param.name": param, "param.zero_readout": True})


def _hooks(model: Transformer, store: dict[str, list[float]]) -> list:
    def recorder(kind: str):
        def hook(_module, _inputs, output):
            tensor = output[0] if isinstance(output, tuple) else output
            store[kind].append(tensor.detach().abs().mean().item())
        return hook

    targets = [(model.embed_tokens, "embedding"), (model.residual_out, "residual"), (model.lm_head, "logits")]
    for layer in model.layers:
        targets += [(layer.self_attn, "attention"), (layer.mlp, "ffn")]
    return [module.register_forward_hook(recorder(kind)) for module, kind in targets]


def measure(cfg: RunConfig, loader: SequenceLoader, steps: int, lr: float, seed: int) -> dict[str, list[float]]:
    """Per module kind, the mean |activation| at each of steps + 1 forward passes (the last after `steps` updates)."""
    torch.manual_seed(seed)
    model, param = build_model(cfg, seed=seed)
    groups = param.param_groups(model, lr, 0.0, cfg.train.adam_eps, cfg.train.optimizer, damping(cfg.train))
    optimizer = build_optimizer(cfg.train, groups, model, loss_tokens=loader.global_batch * cfg.train.seq_len)
    per_step: dict[str, list[float]] = {kind: [] for kind in MODULES}
    for step in range(steps + 1):
        store: dict[str, list[float]] = defaultdict(list)
        handles = _hooks(model, store)
        inputs, targets = loader.batch(step)
        loss, _ = language_model_loss(model(inputs), targets)
        for handle in handles:
            handle.remove()
        for kind in MODULES:
            per_step[kind].append(float(np.mean(store[kind])))
        if step < steps:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return per_step


def slope(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log2(value) against log2(size)."""
    return float(np.polyfit(np.log2(sizes), np.log2(values), 1)[0])


def run_coordcheck(base: RunConfig, params: list[str], axis: str, sizes: list[int], steps: int, seeds: int,
                   lr: float, out_dir: str, log=print) -> dict:
    """Run the check, write coordcheck.json and coordcheck.png to `out_dir`, and return the JSON record."""
    runtime.configure_process()
    data = prepare_data(base, log)
    loader = SequenceLoader(data, base.train.seq_len, base.train.micro_batch, base.train.seed)
    sizes = sorted(sizes)
    curves: dict[str, dict[str, list[list[float]]]] = {}
    progress = Progress("coordcheck", len(params) * len(sizes) * seeds, "models")
    done = 0
    for param in params:
        curves[param] = {kind: [] for kind in MODULES}
        for size in sizes:
            cfg = shape_config(base, param, axis, size, sizes[0])
            runs = [measure(cfg, loader, steps, lr, seed) for seed in range(seeds)]
            for kind in MODULES:
                curves[param][kind].append(np.mean([run[kind] for run in runs], axis=0).tolist())
            done += seeds
            log(progress.line(done, done, f"{param} {axis} {size} "))
    slopes = {p: {k: slope(sizes, [c[-1] for c in curves[p][k]]) for k in MODULES} for p in params}
    record = {"axis": axis, "sizes": sizes, "params": params, "steps": steps, "seeds": seeds, "lr": lr,
              "modules": list(MODULES), "curves": curves, "slopes": slopes}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coordcheck.json").write_text(json.dumps(record, indent=2))
    _plot(record, out / "coordcheck.png")
    for param in params:
        log(f"coordcheck: {param} slopes " + ", ".join(f"{k} {v:+.2f}" for k, v in slopes[param].items()))
    log(f"coordcheck: wrote {out / 'coordcheck.json'} and {out / 'coordcheck.png'}")
    return record


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = record["params"]
    fig, axes = plt.subplots(1, len(params), figsize=(4.5 * len(params), 3.8), sharey=True, squeeze=False)
    for ax, param in zip(axes[0], params):
        for kind in record["modules"]:
            last = [curve[-1] for curve in record["curves"][param][kind]]
            ax.plot(record["sizes"], last, marker="o", label=f"{kind} ({record['slopes'][param][kind]:+.2f})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(f"{param}: step {record['steps']}")
        ax.set_xlabel(record["axis"])
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("mean |activation|")
    fig.suptitle(f"coordinate check, lr {record['lr']:g}, {record['seeds']} seeds (legend: log2-log2 slope)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
