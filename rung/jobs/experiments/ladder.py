"""The scaling ladder: train a grid of shapes × token budgets with fixed (transferred) hyperparameters, fit
scaling laws without the largest rung, and check the fit's prediction of that rung.

N is the non-embedding parameter count (active parameters for MoE; Kaplan et al. found the cleanest laws with
it), D the training tokens, compute 6·N·D. Each rung's loss is its validation loss (the final evaluation on the
held-out split; training loss only where the data has no validation split), so the fits predict held-out loss,
not how well a small corpus was memorised; fit.json says which (`loss_used`) and keeps each rung's training loss.
Writes results.jsonl, fit.json and ladder.png.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rung.config import evolve
from rung.errors import ConfigError, RungError
from rung.jobs.config import RunConfig, with_absolute_paths
from rung.jobs.data.prepare import prepare_data
from rung.jobs.experiments.scaling_laws import Chinchilla, fit_chinchilla, fit_power_law, fit_routed_moe
from rung.jobs.experiments.shapes import reshape
from rung.jobs.experiments.sweep import LOSS_LABEL, Point, loss_used, run_points
from rung.jobs.model.counting import count


def rung_points(base: RunConfig, widths: list[int], depths: list[int], experts: list[int | None],
                tokens: list[float]) -> list[tuple[Point, RunConfig]]:
    tokens_per_step = base.train.global_batch * base.train.seq_len
    base_width, base_depth = base.param.base_shape(base.model)
    if base.param.scales_width and (min(widths) < base_width or min(depths) < base_depth):
        raise ConfigError("--widths" if min(widths) < base_width else "--depths",
                          f"every rung must be at least the base (proxy) shape, width {base_width} and depth "
                          f"{base_depth}: the parametrization scales up from it")
    points = []
    for width in widths:
        for depth in depths:
            for expert in experts:
                for budget in tokens:
                    steps = max(int(round(budget / tokens_per_step)), 2)
                    name = f"w{width}-d{depth}" + (f"-e{expert}" if expert else "") + f"-t{steps * tokens_per_step}"
                    cfg = evolve(reshape(base, width=width, depth=depth, experts=expert, base_width=base_width,
                                         base_depth=base_depth),
                                 {"name": name, "train.steps": steps, "train.keep_checkpoints": 0,
                                  "train.warmup_steps": min(base.train.warmup_steps, steps // 10)})
                    points.append((Point(cfg.name, cfg.param.name, width, depth, expert, 0, {}), cfg))
    return points


def fit_ladder(rows: list[dict], moe: bool, bootstrap: int = 50) -> dict:
    """Fits on every ok rung but the largest (by compute), and that rung's predicted vs actual loss."""
    ok = [r for r in rows if r["status"] == "ok"]
    if len(ok) < 2:
        raise RungError(f"the ladder needs at least two successful rungs, got {len(ok)}")
    held = max(ok, key=lambda r: (r["n"] * r["d"], r["n"]))
    train = [r for r in ok if r is not held]
    n, d, loss = (np.array([r[k] for r in train], dtype=float) for k in ("n", "d", "loss"))
    fit: dict = {"points": len(train), "loss_used": loss_used(rows),
                 "held_out": {k: held[k] for k in ("name", "n", "d", "loss", "train_loss")}}
    at_max_d = [r for r in train if r["d"] == max(x["d"] for x in train if x["n"] == r["n"])]
    at_max_n = [r for r in train if r["n"] == max(x["n"] for x in train if x["d"] == r["d"])]
    for key, subset, axis in (("kaplan_n", at_max_d, "n"), ("kaplan_d", at_max_n, "d")):
        xs = sorted({r[axis] for r in subset})
        if len(xs) > 2:
            law = fit_power_law([r[axis] for r in subset], [r["loss"] for r in subset])
            fit[key] = asdict(law)
    if len(train) > 5:
        law = fit_chinchilla(n, d, loss, bootstrap=bootstrap)
        fit["chinchilla"] = asdict(law)
        predicted = float(law.predict(held["n"], held["d"]))
        fit["held_out"].update(predicted=predicted, relative_error=abs(predicted - held["loss"]) / held["loss"])
    if moe and len({r["experts"] for r in train}) > 1 and len(train) > 6:
        fit["routed_moe"] = asdict(fit_routed_moe(n, [r["experts"] for r in train], loss))
    return fit


def run_ladder(base: RunConfig, widths: list[int], depths: list[int], experts: list[int] | None,
               tokens: list[float], out_dir: str, address: str | None = None, log=print, processes: int = 0) -> dict:
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = evolve(with_absolute_paths(base), {"out_dir": str(out / "runs")})
    points = rung_points(base, widths, depths, experts or [None], tokens)
    prepare_data(base, log)
    log(f"ladder: {len(points)} rungs ({len(widths)} widths × {len(depths)} depths × {len(experts or [None])} "
        f"expert counts × {len(tokens)} token budgets)")
    rows = run_points(points, address, "ladder", log, processes)
    for row, (_, cfg) in zip(rows, points):
        size = count(cfg.model, cfg.train.seq_len)
        row.update(n=size.active_params - size.embedding_params, d=cfg.train.steps * cfg.train.global_batch
                   * cfg.train.seq_len, total_params=size.total_params)
    with (out / "results.jsonl").open("w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    fit = fit_ladder(rows, base.model.moe is not None)
    fit["shape_family"] = {"aspect_ratio": base.model.d_model / base.model.n_layers,
                           "head_dim": base.model.resolved_head_dim, "config": base.name}
    (out / "fit.json").write_text(json.dumps(fit, indent=2))
    plot_ladder(rows, fit, out / "ladder.png")
    held = fit["held_out"]
    if "predicted" in held:
        log(f"ladder: held-out rung {held['name']}: predicted {fit['loss_used']} loss {held['predicted']:.4f}, "
            f"actual {held['loss']:.4f} ({held['relative_error']:.1%} off)")
    log(f"ladder: wrote {out}/fit.json and ladder.png")
    return fit


def plot_ladder(rows: list[dict], fit: dict, path: Path) -> None:
    """Loss against training compute, one series per model size, with the fitted compute-optimal frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = [r for r in rows if r["status"] == "ok"]
    for n in sorted({r["n"] for r in ok}):
        mine = sorted((r for r in ok if r["n"] == n), key=lambda r: r["d"])
        ax.plot([6 * r["n"] * r["d"] for r in mine], [r["loss"] for r in mine], marker="o", label=f"N = {n:,}")
    held = fit["held_out"]
    ax.plot([6 * held["n"] * held["d"]], [held["loss"]], "k*", markersize=12, label="held-out rung")
    if "chinchilla" in fit:
        law = Chinchilla(**{k: v for k, v in fit["chinchilla"].items() if k != "intervals"})
        compute = np.logspace(np.log10(min(6 * r["n"] * r["d"] for r in ok)),
                              np.log10(max(6 * r["n"] * r["d"] for r in ok)) + 0.5, 50)
        frontier = [float(law.predict(*law.compute_optimal(c))) for c in compute]
        ax.plot(compute, frontier, "k--", label="fitted compute-optimal frontier")
        if "predicted" in held:
            ax.plot([6 * held["n"] * held["d"]], [held["predicted"]], "rx", markersize=10, label="prediction")
    ax.set_xscale("log")
    ax.set_xlabel("training compute 6·N·D (FLOPs)")
    ax.set_ylabel(LOSS_LABEL.get(fit["loss_used"], "loss"))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plan(budget: float, fit: dict, base: RunConfig) -> dict:
    """The compute-optimal (N, D) for `budget` FLOPs, and the shape of the fit's family closest to that N."""
    if "chinchilla" not in fit:
        raise RungError("the fit has no Chinchilla law (the ladder needs more than 5 successful rungs)")
    law = Chinchilla(**{k: v for k, v in fit["chinchilla"].items() if k != "intervals"})
    n_opt, d_opt = law.compute_optimal(budget)
    family = fit.get("shape_family", {})
    aspect = family.get("aspect_ratio", base.model.d_model / base.model.n_layers)
    head_dim = family.get("head_dim", base.model.resolved_head_dim)
    best = None
    for depth in range(1, 129):
        width = max(head_dim, int(round(aspect * depth / head_dim)) * head_dim)
        # only the shape is counted: the candidate is its own base shape (it may be smaller than the ladder's)
        cfg = reshape(base, width=width, depth=depth, base_width=width, base_depth=depth)
        size = count(cfg.model, cfg.train.seq_len)
        n = size.active_params - size.embedding_params
        if best is None or abs(np.log(n / n_opt)) < abs(np.log(best["non_embedding_params"] / n_opt)):
            best = {"width": width, "depth": depth, "non_embedding_params": n, "total_params": size.total_params}
    tokens_per_step = base.train.global_batch * base.train.seq_len
    return {"budget_flops": budget, "optimal_params": n_opt, "optimal_tokens": d_opt, "shape": best,
            "experts": base.model.moe.n_experts if base.model.moe else None,
            "tokens": d_opt, "steps": int(round(d_opt / tokens_per_step)),
            "predicted_loss": float(law.predict(n_opt, d_opt))}
