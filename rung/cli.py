"""The `rung` command: one entry point, one subcommand per user task.

Every user-facing failure is a RungError, printed as one line naming the problem, with exit status 2 — never a
traceback. Heavy imports (torch, DeepSpeed) happen inside the subcommands so `rung --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import sys

from rung.errors import RungError


def _add_config(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional else None, default="tiny" if optional else None,
                        help="a preset (tiny, tiny-moe, small) or a YAML file" + (" (default: tiny)" if optional else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.d_model=128 (repeatable)")


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rung", description="Train width/depth-scaled language models with "
                                     "hyperparameter transfer on Ray + DeepSpeed, and serve them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="prepare tokenized data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = data_commands.add_parser("prepare", help="train/load the tokenizer and write token shards (cached)")
    _add_config(prepare, optional=True)

    train = commands.add_parser("train", help="train a model with DeepSpeed (several workers through Ray)")
    _add_config(train)
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest verified checkpoint in the run directory")
    train.add_argument("--workers", type=int, help="data-parallel workers (sets train.workers)")
    train.add_argument("--address", help="a Ray cluster to run on (default: RAY_ADDRESS, else an embedded local Ray)")

    count = commands.add_parser("count", help="print parameter and FLOP counts for a config (JSON)")
    _add_config(count)

    coord = commands.add_parser("coordcheck", help="activation size vs width/depth per parametrization (JSON + PNG)")
    _add_config(coord, optional=True)
    coord.add_argument("--params", default="sp,mup", help="comma-separated parametrizations (default: sp,mup)")
    coord.add_argument("--widths", type=_int_list, help="widths to compare, e.g. 32,64,128,256,512")
    coord.add_argument("--depths", type=_int_list, help="depths to compare, e.g. 2,4,8,16 (instead of widths)")
    coord.add_argument("--steps", type=int, default=5, help="training steps per model (default: 5)")
    coord.add_argument("--seeds", type=int, default=3, help="seeds averaged per point (default: 3)")
    coord.add_argument("--lr", type=float, default=1e-2, help="base learning rate, deliberately large (default: 1e-2)")
    coord.add_argument("--out", default="runs/coordcheck", help="output directory (default: runs/coordcheck)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except RungError as err:
        print(f"rung: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rung: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from rung.jobs.loading import load_run_config

    overrides = list(args.overrides)
    if getattr(args, "workers", None) is not None:
        overrides.append(f"train.workers={args.workers}")
    cfg = load_run_config(args.config, overrides)
    if args.command == "data":
        from rung.jobs.train import prepare_data

        data = prepare_data(cfg)
        print(f"data: {data.num_tokens:,} tokens, vocabulary {data.vocab_size}, in {data.path}")
    elif args.command == "train":
        from rung.jobs.train import train

        rows = train(cfg, resume=args.resume, address=args.address)
        print(f"train: done, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} after {rows[-1]['step']} steps, "
              f"run dir {cfg.out_dir}/{cfg.name}")
    elif args.command == "count":
        from rung.jobs.counting import count

        print(json.dumps(count(cfg.model, cfg.train.seq_len).as_dict(), indent=2))
    elif args.command == "coordcheck":
        from rung.jobs.coordcheck import run_coordcheck

        params = [p for p in args.params.split(",") if p]
        axis, sizes = ("depth", args.depths) if args.depths else ("width", args.widths or [32, 64, 128, 256, 512])
        run_coordcheck(cfg, params, axis, sizes, steps=args.steps, seeds=args.seeds, lr=args.lr, out_dir=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
