"""Hyperparameter sweeps: many small rung training runs in parallel as Ray tasks, one row per run, the optimum per
shape interpolated on the log grid, and the μTransfer figure.

Every point trains with the same seed-determined data order; a diverged run (non-finite loss, or loss above
train.max_loss) or a crashed one is a failed row, never the end of the sweep. A run is judged by its validation loss
(the final evaluation on the held-out split), so an optimum cannot be memorisation; without a validation split, by
its training loss over the last fifth of its steps. Rows and summaries record both, and which one decided.

The base (proxy) shape of every point is the sweep's smallest width and depth, so the parametrization — not the
sweep — scales each shape.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rung.config import evolve, from_dict, to_dict
from rung.errors import ConfigError, RungError
from rung.jobs.config import RunConfig, optimizer_settings, with_absolute_paths
from rung.jobs.data.prepare import prepare_data
from rung.jobs.experiments.grid import typed
from rung.jobs.experiments.shapes import reshape
from rung.jobs.params.parametrization import Parametrization
from rung.jobs.params.roles import Role
from rung.platform.progress import Progress


LOSS_LABEL = {"validation": "validation loss (final evaluation)", "training": "training loss (last 20% of steps)"}


@dataclass
class Point:
    name: str
    param: str
    width: int
    depth: int
    experts: int | None
    seed: int
    hparams: dict[str, float]


def make_points(base: RunConfig, params: list[str], widths: list[int], depths: list[int],
                experts: list[int | None], grids: dict[str, list[float]], seeds: int) -> list[tuple[Point, RunConfig]]:
    if not grids or any(not values for values in grids.values()):
        raise ConfigError("--grid", "the grid has no points")
    points = []
    fields = list(grids)
    for param, width, depth, expert, values, seed in itertools.product(
            params, widths, depths, experts, itertools.product(*grids.values()), range(seeds)):
        shaped = reshape(base, width=width, depth=depth, experts=expert, base_width=min(widths),
                         base_depth=min(depths))
        hparams = dict(zip(fields, values))
        name = f"{param}-w{width}-d{depth}" + (f"-e{expert}" if expert else "") + f"-s{seed}-" + "-".join(
            f"{field.split('.')[-1]}{value:.4g}" for field, value in hparams.items())
        cfg = evolve(shaped, {"name": name, "param.name": param, "train.seed": base.train.seed + seed,
                              "train.keep_checkpoints": 0,
                              **{field: typed(shaped, field, value) for field, value in hparams.items()}})
        points.append((Point(name, param, width, depth, expert, seed, hparams), cfg))
    return points


def training_identity(cfg: RunConfig) -> str:
    """Everything a run's training depends on, with the parametrization given by its effect instead of its name.

    At the base shape SP, μP, Depth-μP and CompleteP prescribe the same multipliers and group rules, so a sweep over
    several of them would train the base shape's points once per parametrization for bit-identical losses."""
    rules = Parametrization(cfg.param, cfg.model)
    settings = to_dict(cfg)
    del settings["name"], settings["param"]["name"]
    return json.dumps([settings, asdict(rules.multipliers), {role.value: asdict(rules.rule(role)) for role in Role}],
                      sort_keys=True)


def judged_loss(rows: list[dict]) -> dict:
    """What a finished run is judged by, with both losses on record: `loss` is the validation loss of its final
    evaluation, or — without a validation split — the mean training loss over its last fifth of steps."""
    tail = rows[-max(len(rows) // 5, 1):]
    train_loss = float(np.mean([r["loss"] for r in tail]))
    val_loss = rows[-1].get("val_loss")
    return {"loss": train_loss if val_loss is None else val_loss, "loss_used": "training" if val_loss is None
            else "validation", "train_loss": train_loss, "val_loss": val_loss, "final_loss": rows[-1]["loss"]}


def _run_point(payload: dict) -> dict:
    """One sweep point, inside a Ray task. Returns its result row; never raises for a failed run."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from rung.jobs.train.guard import TrainingDiverged
    from rung.jobs.train.loop import train_here

    cfg = from_dict(RunConfig, payload["config"])
    row = dict(payload["point"])
    started = time.perf_counter()
    try:
        rows = train_here(cfg, log=lambda _line: None)
        row.update(status="ok", **judged_loss(rows), tokens=sum(r["tokens"] for r in rows))
    except TrainingDiverged as err:
        row.update(status="diverged", error=str(err))
    except RungError as err:
        row.update(status="failed", error=str(err))
    except Exception as err:  # a crashed run is a row, never the end of the sweep
        row.update(status="crashed", error=f"{type(err).__name__}: {err}")
    row["seconds"] = time.perf_counter() - started
    return row


def run_points(points: list[tuple[Point, RunConfig]], address: str | None, label: str, log=print,
               processes: int = 0) -> list[dict]:
    """Train every point and collect the rows in order: as Ray tasks (one CPU, or one GPU when train.use_gpu), or,
    with `processes` > 0, in that many local processes without Ray (a lone GPU box where Ray is not installed)."""
    payloads = [{"point": asdict(p), "config": to_dict(c)} for p, c in points]
    rows: list[dict | None] = [None] * len(points)
    progress = Progress(label, len(points), "runs")
    for done, (index, row) in enumerate(_completed(payloads, address, processes), start=1):
        rows[index] = row
        outcome = (f"{row['loss_used']} loss {row['loss']:.4f} (training {row['train_loss']:.4f})"
                   if row["status"] == "ok" else row["status"])
        log(progress.line(done, done, f"{row['name']}: {outcome} | "))
    return rows


def _completed(payloads: list[dict], address: str | None, processes: int) -> Iterator[tuple[int, dict]]:
    """(index, row) pairs in the order the runs finish."""
    if processes > 0:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_point, payload): i for i, payload in enumerate(payloads)}
            for future in as_completed(futures):
                yield futures[future], future.result()
        return
    from rung.platform import cluster

    cluster.connect(address)
    import ray

    gpu = payloads[0]["config"]["train"]["use_gpu"]
    task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=0)(_run_point)
    pending = {task.remote(payload): i for i, payload in enumerate(payloads)}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(ready[0]), ray.get(ready[0])


def _log2_optimum(values: list[float], losses: list[float]) -> float:
    """Vertex of a parabola through the best point and its grid neighbours in log2(value), clamped to the grid."""
    x = np.log2(values)
    best = int(np.argmin(losses))
    if best == 0 or best == len(values) - 1:
        return float(x[best])
    a, b, _ = np.polyfit(x[best - 1:best + 2], losses[best - 1:best + 2], 2)
    return float(np.clip(-b / (2 * a), x[best - 1], x[best + 1])) if a > 0 else float(x[best])


def summarize(rows: list[dict], fields: list[str], sweep_id: str, base_shape: dict, optimizer: dict) -> dict:
    """Per shape the best point and the fitted optimum; per parametrization the optimum's spread across shapes and
    the values to transfer, with the `optimizer` settings they were tuned under (they transfer together)."""
    shapes = []
    keys = sorted({(r["param"], r["width"], r["depth"], r["experts"] or 0) for r in rows})
    for param, width, depth, experts in keys:
        mine = [r for r in rows if (r["param"], r["width"], r["depth"], r["experts"] or 0) == (param, width, depth,
                                                                                              experts)]
        by_point: dict[tuple, list[float]] = {}
        for r in mine:
            if r["status"] == "ok" and math.isfinite(r["loss"]):
                by_point.setdefault(tuple(r["hparams"][f] for f in fields), []).append(r["loss"])
        if not by_point:
            shapes.append({"param": param, "width": width, "depth": depth, "experts": experts or None,
                           "status": "every run failed"})
            continue
        mean = {point: float(np.mean(losses)) for point, losses in by_point.items()}
        best = min(mean, key=mean.get)
        train_at_best = [r["train_loss"] for r in mine if r["status"] == "ok"
                         and tuple(r["hparams"][f] for f in fields) == best]
        optimum = {}
        for i, field in enumerate(fields):  # along each field, through the best point
            line = sorted((p[i], loss) for p, loss in mean.items() if all(p[j] == best[j] for j in range(len(best))
                                                                          if j != i))
            optimum[field] = _log2_optimum([v for v, _ in line], [loss for _, loss in line])
        shapes.append({"param": param, "width": width, "depth": depth, "experts": experts or None,
                       "best": dict(zip(fields, best)), "best_loss": mean[best],
                       "best_train_loss": float(np.mean(train_at_best)), "optimum_log2": optimum,
                       "optimum": {f: 2.0 ** v for f, v in optimum.items()}})
    spread, transfer = {}, {}
    for param in sorted({s["param"] for s in shapes}):
        fitted = [s for s in shapes if s["param"] == param and "optimum_log2" in s]
        if not fitted:
            continue
        spread[param] = {f: max(s["optimum_log2"][f] for s in fitted) - min(s["optimum_log2"][f] for s in fitted)
                         for f in fields}
        proxy = min(fitted, key=lambda s: (s["width"], s["depth"], s["experts"] or 0))
        transfer[param] = {"proxy": {"width": proxy["width"], "depth": proxy["depth"], "experts": proxy["experts"]},
                           "values": proxy["optimum"]}
    return {"sweep_id": sweep_id, "fields": fields, "base_shape": base_shape, "optimizer": optimizer,
            "loss_used": loss_used(rows),
            "shapes": shapes, "spread_octaves": spread, "transfer": transfer}


def loss_used(rows: list[dict]) -> str:
    """Which loss the rows were judged by: "validation", "training", or "none" when every run failed."""
    kinds = {r["loss_used"] for r in rows if r["status"] == "ok"}
    return kinds.pop() if len(kinds) == 1 else "none" if not kinds else "mixed"


def run_sweep(base: RunConfig, grids: dict[str, list[float]], params: list[str], widths: list[int] | None,
              depths: list[int] | None, experts: list[int] | None, seeds: int, out_dir: str,
              address: str | None = None, log=print, processes: int = 0) -> dict:
    """Run the sweep (`processes`: see run_points); writes results.jsonl, summary.json and sweep.png into `out_dir` and returns the summary."""

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = evolve(with_absolute_paths(base), {"out_dir": str(out / "runs")})
    widths, depths = widths or [base.model.d_model], depths or [base.model.n_layers]
    points = make_points(base, params, widths, depths, experts or [None], grids, seeds)
    prepare_data(base, log)  # once, here: every task then finds the shards in the cache
    sweep_id = uuid.uuid4().hex[:12]
    log(f"sweep {sweep_id}: {len(points)} runs ({len(params)} parametrizations × {len(widths)} widths × "
        f"{len(depths)} depths × {len(experts or [None])} expert counts × "
        f"{math.prod(len(v) for v in grids.values())} grid points × {seeds} seeds)")
    first: dict[str, int] = {}
    trained_as = [first.setdefault(training_identity(cfg), i) for i, (_, cfg) in enumerate(points)]
    distinct = sorted(first.values())
    if len(distinct) < len(points):
        log(f"sweep: {len(points) - len(distinct)} points are the same model as another parametrization's (its base "
            f"shape) and share its run: {len(distinct)} to train")
    trained = dict(zip(distinct, run_points([points[i] for i in distinct], address, "sweep", log, processes)))
    rows = [trained[i] if j == i else {**trained[j], **asdict(point), "same_run_as": trained[j]["name"]}
            for i, ((point, _), j) in enumerate(zip(points, trained_as))]
    with (out / "results.jsonl").open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    summary = summarize(rows, list(grids), sweep_id, {"width": min(widths), "depth": min(depths)},
                        optimizer_settings(base.train))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_sweep(rows, list(grids)[0], out / "sweep.png")
    failed = sum(r["status"] != "ok" for r in rows)
    log(f"sweep: {len(rows) - failed} runs ok, {failed} failed, judged by {summary['loss_used']} loss; wrote "
        f"{out}/results.jsonl, summary.json, sweep.png")
    for param, spread in summary["spread_octaves"].items():
        log(f"sweep: {param}: optimum spread across shapes " + ", ".join(f"{f} {v:.2f} octaves"
                                                                        for f, v in spread.items()))
    return summary


def plot_sweep(rows: list[dict], field: str, path: Path) -> None:
    """Loss against the first grid field (log2), one curve per shape, one panel per parametrization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sorted({r["param"] for r in rows})
    fig, axes = plt.subplots(1, len(params), figsize=(5 * len(params), 4), sharey=True, squeeze=False)
    ok = [r for r in rows if r["status"] == "ok"]
    top = max((r["loss"] for r in ok), default=1.0)
    for ax, param in zip(axes[0], params):
        shapes = sorted({(r["width"], r["depth"], r["experts"] or 0) for r in rows if r["param"] == param})
        for width, depth, experts in shapes:
            mine = [r for r in rows if r["param"] == param and (r["width"], r["depth"], r["experts"] or 0) ==
                    (width, depth, experts)]
            xs = sorted({r["hparams"][field] for r in mine})
            ys = [np.mean([r["loss"] for r in mine if r["hparams"][field] == x and r["status"] == "ok"] or [np.nan])
                  for x in xs]
            label = f"width {width}, depth {depth}" + (f", {experts} experts" if experts else "")
            line, = ax.plot(np.log2(xs), ys, marker="o", label=label)
            failed = [x for x in xs if all(r["status"] != "ok" for r in mine if r["hparams"][field] == x)]
            ax.plot(np.log2(failed), [top] * len(failed), "x", color=line.get_color())
        ax.set_title(param)
        ax.set_xlabel(f"log2 {field}")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(LOSS_LABEL.get(loss_used(rows), "loss") + " (x = diverged)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
