"""Evidence that hyperparameters transfer (`make bench-transfer`): LR sweeps across widths (μP vs SP; per optimizer
with `--optimizers adamw,muon,shampoo,soap,kfac`), damping across widths for those of `--optimizers` that take one
(`--parts damping`: Shampoo, K-FAC), depths (CompleteP and Depth-μP vs SP) and MoE expert counts, and the ladder's
prediction of its held-out rung.

Each part writes its sweep/ladder folder under OUT; the figures that matter are printed and collected in
OUT/evidence.json for bench/RESULTS.md, with the loss each decision used (validation loss since rung has a held-out
split; the committed folders predate it and are on training loss). Hours of CPU at the full settings; `--quick` is
a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from rung.jobs.experiments.grid import parse_grid  # noqa: E402
from rung.jobs.experiments.ladder import run_ladder  # noqa: E402
from rung.jobs.experiments.sweep import run_sweep  # noqa: E402
from rung.jobs.loading import load_run_config  # noqa: E402


DAMPED = ("shampoo", "kfac")  # the optimizers with a train.damping


def verdict(summary: dict, param: str, field: str = "train.lr") -> dict:
    """Octaves the optimum of `field` moved across shapes, and whether the best loss fell strictly with size;
    `loss_used` says which loss (validation, or training in folders made before rung had a validation split)."""
    shapes = sorted((s for s in summary["shapes"] if s["param"] == param and "best_loss" in s),
                    key=lambda s: (s["width"], s["depth"], s["experts"] or 0))
    losses = [s["best_loss"] for s in shapes]
    return {"loss_used": summary.get("loss_used", "training"),
            f"optimum_log2_{field.removeprefix('train.')}": [round(s["optimum_log2"][field], 2) for s in shapes],
            "spread_octaves": summary["spread_octaves"].get(param, {}).get(field),
            "best_loss": [round(x, 4) for x in losses],
            "loss_falls_with_size": all(b < a for a, b in zip(losses, losses[1:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/transfer")
    parser.add_argument("--quick", action="store_true", help="a few short runs, to check the plumbing")
    parser.add_argument("--parts", default="width,depth,moe,ladder",
                        help="of width, damping (of shampoo and kfac in --optimizers), depth, moe, ladder")
    parser.add_argument("--optimizers", default="adamw",
                        help="train.optimizer values the width part sweeps, each into its own folder (width for "
                             "adamw, width-NAME for the others), e.g. adamw,muon")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field for every run, e.g. --set train.precondition_block=16 (repeatable)")
    parser.add_argument("--label", default="", help="appended to the width and damping parts' folder names and "
                        "evidence keys, to tell runs with other --set apart (e.g. -tiles-16)")
    parser.add_argument("--widths", default="32,64,128,256", help="widths of the width sweep")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--processes", type=int, default=0,
                        help="run points in N local processes instead of Ray tasks (a GPU box without Ray)")
    parser.add_argument("--gpu", action="store_true", help="train on the GPU (train.use_gpu)")
    parser.add_argument("--steps", type=int, default=300,
                        help="optimizer steps per point (300 × 1k tokens was the shortest horizon that ranked LRs)")
    parser.add_argument("--batch", type=int, default=8, help="sequences of 128 tokens per step (ladder budgets scale)")
    parser.add_argument("--depth-params", default="completep,depth-mup,sp",
                        help="parametrizations of the depth sweep (SP is the control)")
    parser.add_argument("--depths", default="2,4,8,16", help="depths of the depth sweep")
    parser.add_argument("--lr-grid", default="lr=2^-11:2^-4:x2^0.5",
                        help="the LR grid of the sweeps (an octave grid halves a CPU run's hours)")
    parser.add_argument("--budgets", default="1e5,2e5,4e5",
                        help="the ladder's token budgets at batch 8 (scaled with --batch)")
    parser.add_argument("--damping-grid", default="damping=2^-16:2^-4:x4",
                        help="the damping part's grid (train.damping)")
    parser.add_argument("--damping-lr", type=float, default=None,
                        help="the damping part's LR (default: the optimizer's width part's μP proxy optimum, else "
                             "0.01)")
    parser.add_argument("--ladder-lr", type=float, default=None,
                        help="the ladder's LR (default: the width part's μP proxy optimum, else 0.01)")
    args = parser.parse_args()
    out = Path(args.out)
    steps, seeds = (40, 1) if args.quick else (args.steps, args.seeds)
    common = [f"train.use_gpu={str(args.gpu).lower()}", f"train.steps={steps}", "train.warmup_steps=10",
              "train.seq_len=128", f"train.global_batch={args.batch}", f"train.micro_batch={args.batch}",
              "train.max_loss=10", "train.schedule=cosine", *args.set]  # 1k tokens per step at batch 8
    lrs = dict([parse_grid("lr=2^-10:2^-5:x2" if args.quick else args.lr_grid)])
    widths = [32, 64] if args.quick else [int(w) for w in args.widths.split(",")]
    evidence_path = out / "evidence.json"  # parts run one at a time add to it
    evidence = json.loads(evidence_path.read_text()) if evidence_path.exists() else {}
    for optimizer in args.optimizers.split(",") if "width" in args.parts else ():
        part = ("width" if optimizer == "adamw" else f"width-{optimizer}") + args.label
        summary = run_sweep(load_run_config("tiny", [*common, f"train.optimizer={optimizer}"]), lrs, ["mup", "sp"],
                            widths, None, None, seeds, str(out / part), processes=args.processes)
        evidence[part] = {p: verdict(summary, p) for p in ("mup", "sp")}
    for optimizer in [o for o in args.optimizers.split(",") if o in DAMPED] if "damping" in args.parts else ():
        # damping swept at one LR across widths: does μP's damping rule (× 1 in width) keep its optimum in place?
        width_part = evidence.get(f"width-{optimizer}{args.label}")
        lr = args.damping_lr or (2 ** width_part["mup"]["optimum_log2_lr"][0] if width_part else 0.01)
        summary = run_sweep(load_run_config("tiny", [*common, f"train.optimizer={optimizer}", f"train.lr={lr}"]),
                            dict([parse_grid(args.damping_grid)]), ["mup", "sp"], widths, None, None, seeds,
                            str(out / f"damping-{optimizer}{args.label}"), processes=args.processes)
        evidence[f"damping-{optimizer}{args.label}"] = {"lr": lr, **{p: verdict(summary, p, "train.damping")
                                                         for p in ("mup", "sp")}}
    if "depth" in args.parts:
        depth_params = args.depth_params.split(",")
        summary = run_sweep(load_run_config("tiny", common), lrs, depth_params, None,
                            [2, 4] if args.quick else [int(d) for d in args.depths.split(",")], None, seeds,
                            str(out / "depth"),
                            processes=args.processes)
        evidence["depth"] = {p: verdict(summary, p) for p in depth_params}
    if "moe" in args.parts:
        summary = run_sweep(load_run_config("tiny-moe", [*common, "model.moe.top_k=1"]), lrs, ["mup"], None, None,
                            [2, 4] if args.quick else [2, 4, 8], seeds, str(out / "moe"),
                            processes=args.processes)
        evidence["moe"] = {"mup": verdict(summary, "mup")}
    if "ladder" in args.parts:
        # the ladder trains at the LR the width sweep found for its proxy (μP transfers it), else a fixed one
        lr = args.ladder_lr or (2 ** evidence["width"]["mup"]["optimum_log2_lr"][0] if "width" in evidence else 0.01)
        budgets = [float(b) * args.batch / 8 for b in ("2e4,4e4" if args.quick else args.budgets).split(",")]
        fit = run_ladder(load_run_config("tiny", [*common, "param.base_width=32", f"train.lr={lr}"]),
                         [32, 64] if args.quick else [32, 48, 64, 96, 128], [2], None, budgets, str(out / "ladder"),
                         processes=args.processes)
        evidence["ladder"] = {**fit["held_out"], "loss_used": fit["loss_used"]}
    evidence_path.write_text(json.dumps(evidence, indent=2))
    print(json.dumps(evidence, indent=2))


if __name__ == "__main__":
    main()
