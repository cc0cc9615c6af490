"""`rung eval` and `rung quantize` as subcommands: their flags and what they run. Torch-free until a command runs,
so `rung --help` stays instant."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path

from rung.errors import ConfigError, RungError
from rung.serving.flags import add_model_settings, flag_of, model_settings

DEFAULT_CALIBRATION_TOKENS = 16384


def add_model_tool_parsers(commands) -> None:
    evaluate = commands.add_parser("eval", help="a model folder's perplexity on held-out text, computed as `rung "
                                               "serve` computes (JSON)")
    evaluate.add_argument("model_dir", help="a Hugging Face model folder")
    evaluate.add_argument("--data", required=True,
                          help="held-out text: a UTF-8 file (one document) or .jsonl of {\"text\": ...} lines")
    add_model_settings(evaluate)
    evaluate.add_argument("--context", type=int, help="tokens per scored window (default: the model's context)")
    evaluate.add_argument("--max-tokens", type=int, help="score only the data's first N tokens (default: all)")
    evaluate.add_argument("--json", dest="json_path", metavar="PATH", help="also write the result here")

    quantize = commands.add_parser("quantize", help="write a model folder with int8/int4 projections, each "
                                                    "projection's width chosen by measured sensitivity")
    quantize.add_argument("model_dir", help="a Hugging Face model folder (float)")
    quantize.add_argument("--out", required=True, help="the folder to write (refused if it exists and is not empty)")
    quantize.add_argument("--bits-budget", type=float, required=True, metavar="BITS",
                          help="average bits per projection weight, scales included: 4.25 is all int4 in groups of "
                               "128, about 8 all int8, between them a mix")
    quantize.add_argument("--group-size", type=int, default=128, help="int4's input features per scale (default: 128)")
    quantize.add_argument("--calibration", metavar="FILE",
                          help="text (or JSONL of {\"text\": ...}) to measure sensitivity on (default: the validation "
                               "split of the run a rung export came from)")
    quantize.add_argument("--calibration-tokens", type=int, default=DEFAULT_CALIBRATION_TOKENS,
                          help=f"at most this many calibration tokens (default: {DEFAULT_CALIBRATION_TOKENS})")
    quantize.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def run_model_tool(args: argparse.Namespace, default_calibration: Callable[[str, int], object]) -> int:
    """`default_calibration(model_dir, tokens)`: token ids to calibrate on when --calibration is not given (the CLI
    passes the exporting run's validation split, which only the training side can find)."""
    if not os.path.isdir(args.model_dir):
        raise RungError(f"model folder not found: {args.model_dir}")
    if args.command == "eval":
        return _evaluate(args)
    from rung.serving.model_tools.quantize import quantize_folder

    calibration = args.calibration
    if calibration is None:
        calibration = default_calibration(args.model_dir, max(args.calibration_tokens, 0))
    report = quantize_folder(args.model_dir, args.out, args.bits_budget, calibration, args.group_size,
                             args.calibration_tokens, args.overwrite)
    counts = {bits: sum(u["bits"] == bits for u in report["units"].values()) for bits in (8, 4)}
    print(f"quantize: wrote {args.out}: {counts[8]} projections at int8, {counts[4]} at int4, "
          f"{report['average_bits']:.3f} bits per weight")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rung.serving.config import engine_config
    from rung.serving.model_tools.perplexity import evaluate

    try:
        config = engine_config(model_settings(args))
        result = evaluate(args.model_dir, args.data, config, args.context, args.max_tokens)
    except ConfigError as err:
        raise flag_of(err) from None
    text = json.dumps(result, indent=2)
    if args.json_path:
        Path(args.json_path).write_text(text + "\n")
    print(text)
    return 0
