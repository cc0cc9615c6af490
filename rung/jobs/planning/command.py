"""`rung plan`'s flags and answer. Imports nothing heavy until it runs, so the CLI starts without torch."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from rung.errors import ConfigError, RungError
from rung.jobs.config import Recompute, RunConfig
from rung.platform.gpus import GPUS, PLANNING_MFU, gpu_named


def add_plan_parser(commands, add_config: Callable[..., None]) -> None:
    plan = commands.add_parser("plan", help="memory per GPU, whether the run fits, the largest micro-batch and the "
                               "step time; with --fit, the compute-optimal size (exit 1: does not fit)")
    add_config(plan, optional=True)
    plan.add_argument("--gpus", type=int, help="data-parallel GPUs (default: the config's train.workers)")
    plan.add_argument("--gpu", default="h100", help=f"the card: {', '.join(GPUS)} (default: h100)")
    plan.add_argument("--zero", type=int, choices=range(4), help="ZeRO stage (default: the config's)")
    plan.add_argument("--activation-checkpointing", choices=get_args(Recompute),
                      help="recompute none, full blocks or the FFN (default: the config's)")
    plan.add_argument("--mfu", type=float, default=PLANNING_MFU,
                      help=f"the MFU the time estimate assumes (default: {PLANNING_MFU})")
    plan.add_argument("--fit", help="a ladder's fit.json: add the compute-optimal size for the run's FLOPs")
    plan.add_argument("--budget", type=float, help="with --fit: this FLOP budget instead of the run's, e.g. 1e20")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")


def plan_overrides(args: argparse.Namespace) -> list[str]:
    """The plan's flags as config overrides, so the config's own validation judges them."""
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError("--gpus", f"must be >= 1, got {args.gpus}")
    if not 0 < args.mfu <= 1:
        raise ConfigError("--mfu", f"must be in (0, 1], got {args.mfu}")
    if args.budget is not None and not args.fit:
        raise ConfigError("--budget", "needs --fit (a ladder's fit.json)")
    if args.budget is not None and not (math.isfinite(args.budget) and args.budget > 0):
        raise ConfigError("--budget", f"must be a positive number of FLOPs, got {args.budget}")
    gpu_named(args.gpu)
    return [*([f"train.workers={args.gpus}"] if args.gpus is not None else []),
            *([f"train.zero_stage={args.zero}"] if args.zero is not None else []),
            *([f"train.activation_checkpointing={args.activation_checkpointing}"]
              if args.activation_checkpointing else [])]


def run_plan(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Print the plan; 0 when the run fits, 1 when it does not."""
    from rung.jobs.experiments.ladder import plan as compute_optimal
    from rung.jobs.model.counting import count
    from rung.jobs.planning.plan import plan_training, report
    from rung.jobs.train.deepspeed_engine import check_launchable

    gpus = cfg.train.workers
    check_launchable(cfg, gpus)
    fit = _read_fit(args.fit) if args.fit else None
    planned = plan_training(cfg, gpus, gpu_named(args.gpu), args.mfu)
    result = planned.as_dict()
    if fit is not None:
        train = cfg.train
        run_flops = count(cfg.model, train.seq_len).flops_per_token * train.steps * train.global_batch * train.seq_len
        result["compute_optimal"] = compute_optimal(args.budget or float(run_flops), fit, cfg)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0 if planned.fits else 1
    print(report(cfg, planned))
    if fit is not None:
        best = result["compute_optimal"]
        print(f"compute-optimal for {best['budget_flops']:.3g} FLOPs: {best['optimal_params']:.3g} non-embedding "
              f"parameters (width {best['shape']['width']}, depth {best['shape']['depth']}) on "
              f"{best['optimal_tokens']:.3g} tokens ({best['steps']:,} steps), predicted loss "
              f"{best['predicted_loss']:.3f}")
    return 0 if planned.fits else 1


def _read_fit(name: str) -> dict:
    path = Path(name)
    if not path.is_file():
        raise RungError(f"--fit {path} not found (a ladder's fit.json)")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise RungError(f"--fit {path} is not JSON") from None
