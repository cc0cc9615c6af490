"""The `rung` command: one entry point, one subcommand per user task.

Every user-facing failure is a RungError, printed as one line naming the problem, with exit status 2 — never a
traceback. Heavy imports (torch, DeepSpeed) happen inside the subcommands so `rung --help` stays instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rung.config import default
from rung.errors import ConfigError, RungError
from rung.jobs.pipeline import PipelineOptions
from rung.jobs.planning.command import add_plan_parser, plan_overrides, run_plan
from rung.jobs.presets import PRESETS
from rung.serving.flags import add_serve_settings, flag_of, serve_settings
from rung.serving.model_tools.command import add_model_tool_parsers, run_model_tool


def _add_config(parser: argparse.ArgumentParser, optional: bool = False) -> None:
    parser.add_argument("config", nargs="?" if optional else None, default="tiny" if optional else None,
                        help=f"a preset ({', '.join(PRESETS)}) or a YAML file" + (" (default: tiny)" if optional else ""))
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


def _int_pair(text: str) -> tuple[int, int]:
    values = _int_list(text)
    if len(values) != 2 or values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX with MIN <= MAX, got {text!r}")
    return values[0], values[1]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rung", description="Train width/depth-scaled language models with "
                                     "hyperparameter transfer on Ray + DeepSpeed, and serve them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="prepare tokenized data")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prepare = data_commands.add_parser("prepare", help="train/load the tokenizer and write training and validation "
                                       "token shards (cached)")
    _add_config(prepare, optional=True)
    prepare.add_argument("--workers", dest="data_workers", type=int, default=0, metavar="N",
                         help="tokenize on Ray Data with this many parallel workers (0: in this process); the shards "
                         "are the same bytes either way")
    prepare.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else an embedded local "
                         "cluster); every node must see the source files")

    train = commands.add_parser("train", help="train a model with DeepSpeed (several workers through Ray)")
    _add_config(train)
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest verified checkpoint in the run directory")
    train.add_argument("--restart", action="store_true",
                       help="train again from step 0 where the run directory holds checkpoints (even damaged ones), "
                            "replacing them")
    train.add_argument("--workers", type=int, help="data-parallel workers (sets train.workers)")
    train.add_argument("--hparams-from", metavar="SUMMARY",
                       help="a sweep's summary.json: take its best values at the proxy shape, and the proxy shape as "
                            "the base shape")
    train.add_argument("--address", help="a Ray cluster to run on (default: RAY_ADDRESS, else an embedded local Ray)")

    sweep = commands.add_parser("sweep", help="sweep hyperparameters over shapes as parallel Ray tasks")
    _add_config(sweep)
    sweep.add_argument("--grid", action="append", required=True, metavar="NAME=VALUES",
                       help="lr=2^-12:2^-4:x2, lr=2^-10:2^-6:x2^0.5 or init_std=0.01,0.02 (repeatable: a product)")
    sweep.add_argument("--widths", type=_int_list, help="widths, e.g. 64,128,256 (default: the config's)")
    sweep.add_argument("--depths", type=_int_list, help="depths, e.g. 2,4,8 (default: the config's)")
    sweep.add_argument("--experts", type=_int_list, help="MoE expert counts, e.g. 2,4,8")
    sweep.add_argument("--params", default="mup", help="comma-separated parametrizations (default: mup)")
    sweep.add_argument("--seeds", type=int, default=1, help="seeds per point (default: 1)")
    sweep.add_argument("--out", required=True, help="output directory")
    sweep.add_argument("--address", help="a Ray cluster (default: RAY_ADDRESS, else an embedded local Ray)")

    ladder = commands.add_parser("ladder", help="train a ladder of sizes and token budgets, fit scaling laws")
    _add_config(ladder)
    ladder.add_argument("--widths", type=_int_list, required=True, help="widths, e.g. 32,64,128")
    ladder.add_argument("--depths", type=_int_list, help="depths (default: the config's)")
    ladder.add_argument("--experts", type=_int_list, help="MoE expert counts, e.g. 2,4,8")
    ladder.add_argument("--tokens", required=True, help="token budgets, e.g. 1e5,2e5,4e5")
    ladder.add_argument("--hparams-from", metavar="SUMMARY", help="a sweep's summary.json to transfer from")
    ladder.add_argument("--out", required=True, help="output directory")
    ladder.add_argument("--address", help="a Ray cluster (default: RAY_ADDRESS, else an embedded local Ray)")

    add_plan_parser(commands, _add_config)

    submit = commands.add_parser("submit", help="submit a command as a job to a Ray cluster (Jobs API)")
    submit.add_argument("--address", help="the dashboard's Jobs API (default: RAY_ADDRESS, else http://127.0.0.1:8265)")
    submit.add_argument("--working-dir", help="a directory uploaded as the job's working directory")
    submit.add_argument("--submission-id", help="the job's id (default: generated)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment for the job")
    submit.add_argument("--no-wait", action="store_true", help="return after submitting instead of following logs")
    submit.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the job's command, e.g. -- rung train tiny")

    jobs = commands.add_parser("jobs", help="status, logs, stop or list jobs on a Ray cluster")
    jobs.add_argument("action", choices=["status", "logs", "stop", "list"])
    jobs.add_argument("job_id", nargs="?", help="the submission id (not needed for list)")
    jobs.add_argument("--address", help="the dashboard's Jobs API (default: RAY_ADDRESS, else http://127.0.0.1:8265)")

    export = commands.add_parser("export", help="write a checkpoint as a Hugging Face model folder")
    export.add_argument("source", help="a run directory (its newest verified checkpoint) or a checkpoint directory")
    export.add_argument("--out", required=True, help="the folder to write (refused if it exists and is not empty)")
    export.add_argument("--format", choices=["llama", "granite"], default="llama",
                        help="llama: Llama/Mixtral with multipliers folded (default); granite: native multipliers")
    export.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    export.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    export.add_argument("--allow-dropless", action="store_true",
                        help="export an MoE trained with capacity-factor dropping as the dropless model")
    export.add_argument("--max-shard-size", type=int, default=5 << 30, metavar="BYTES",
                        help="split weights into shards of at most this size (default 5 GiB)")
    export.add_argument("--layers", metavar="K|every-N", help="a depth cut: the first K layers, or the last of "
                        "every N (layers N-1, 2N-1, ...), with the parent's multipliers")
    export.add_argument("--width-fraction", type=float, metavar="F", help="a width cut: the first F of every layer's "
                        "heads, key/value heads and feed-forward units (d_model and the multipliers stay)")

    pipeline = commands.add_parser("pipeline", help="data → μP sweep → transfer to a wider model on Ray workers → "
                                                    "export → serve, with a chat completion as the smoke test")
    _add_config(pipeline, optional=True)
    options = lambda name: default(PipelineOptions, name)  # noqa: E731 - the flags' defaults are the options'
    pipeline.add_argument("--out", default=options("out"),
                          help=f"where every stage writes (default: {options('out')})")
    pipeline.add_argument("--sweep-grid", default=options("sweep_grid"),
                          help=f"the proxy's LR grid (default: {options('sweep_grid')})")
    pipeline.add_argument("--sweep-steps", type=int, default=options("sweep_steps"),
                          help=f"steps per sweep run (default: {options('sweep_steps')})")
    pipeline.add_argument("--target-width-factor", type=int, default=options("target_width_factor"),
                          help=f"the target is this many times the config's width (default: "
                               f"{options('target_width_factor')})")
    pipeline.add_argument("--workers", type=int, default=options("workers"),
                          help=f"DeepSpeed ZeRO-2 workers for the target (default: {options('workers')})")
    pipeline.add_argument("--address", help="a Ray cluster (default: RAY_ADDRESS, else an embedded local Ray)")
    pipeline.add_argument("--host", default=options("host"), help=f"where to serve (default: {options('host')})")
    pipeline.add_argument("--port", type=int, default=options("port"),
                          help=f"serving port; a free one if taken (default: {options('port')})")
    pipeline.add_argument("--exit", action="store_true", help="stop after the smoke request instead of serving on")

    serve = commands.add_parser("serve", help="serve a Hugging Face model folder over an OpenAI-compatible API")
    serve.add_argument("model_dir", help="a Hugging Face model folder (rung's exports or a supported third party)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    add_serve_settings(serve)
    serve.add_argument("--tune", action="store_true",
                       help="profile step time per nano-batch split, store the best for this device and model, exit")
    serve.add_argument("--ray", action="store_true", help="run as a Ray Serve application (replicas on Ray)")
    scale = serve.add_mutually_exclusive_group()
    scale.add_argument("--replicas", type=int, default=1, help="with --ray: fixed number of replicas (default: 1)")
    scale.add_argument("--autoscale", type=_int_pair, metavar="MIN,MAX",
                       help="with --ray: autoscale between MIN and MAX replicas on ongoing requests")
    serve.add_argument("--address", help="with --ray: a Ray cluster (default: RAY_ADDRESS, else an embedded local Ray)")

    add_model_tool_parsers(commands)

    bench = commands.add_parser("bench", help="benchmarks: `rung bench serve` loads an OpenAI-compatible server")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    load = bench_commands.add_parser("serve", help="streaming load against any OpenAI-compatible server")
    load.add_argument("--base-url", required=True, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
    load.add_argument("--model", required=True, help="the model name the server serves")
    load.add_argument("--dataset", default="random",
                      help="'random', or a JSONL file of {prompt, output_len} or ShareGPT-style conversations")
    load.add_argument("--num-prompts", type=int, default=100, help="requests to send (default: 100)")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="requests per second, Poisson arrivals; inf sends all at once (default: inf)")
    load.add_argument("--max-concurrency", type=int, help="most requests in flight at once (default: no cap)")
    load.add_argument("--random-input-len", type=int, default=128, help="random dataset: prompt words (±50%%)")
    load.add_argument("--random-output-len", type=int, default=64, help="random dataset: output tokens (±50%%)")
    load.add_argument("--prefix-len", type=int, default=0,
                      help="random dataset: words of one shared prefix (a system prompt) before every prompt")
    load.add_argument("--turns", type=int, default=1,
                      help="random dataset: turns per conversation; each resends the conversation so far and a new "
                           "message of --random-input-len words, so --num-prompts conversations make "
                           "NUM-PROMPTS × TURNS requests (default: 1)")
    load.add_argument("--goodput", metavar="SLOS", help="SLOs in ms for goodput, e.g. ttft:500,tpot:50,e2el:5000")
    load.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default: 0)")
    load.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    load.add_argument("--json", dest="json_path", metavar="PATH", help="write the summary and every request here")
    load.add_argument("--plot", metavar="PATH", help="write a PNG of latency against request start time here")

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
    if args.command in ("submit", "jobs"):
        return _jobs_command(args)
    if args.command == "serve":
        return _serve_command(args)
    if args.command == "pipeline":
        return _pipeline_command(args)
    if args.command in ("eval", "quantize"):
        return run_model_tool(args, _exported_run_validation_ids)
    if args.command == "bench":
        from rung.serving.loadgen import bench_serve

        for flag, value, least in (("--num-prompts", args.num_prompts, 1), ("--turns", args.turns, 1),
                                   ("--prefix-len", args.prefix_len, 0)):
            if value < least:
                raise RungError(f"{flag} must be at least {least}, got {value}")
        summary = bench_serve(args.base_url, args.model, args.dataset, args.num_prompts, args.request_rate,
                              args.max_concurrency, args.seed, args.random_input_len, args.random_output_len,
                              args.goodput, args.api_key, args.json_path, args.plot, args.prefix_len, args.turns)
        return 0 if summary["successful_requests"] else 1
    if args.command == "export":
        from rung.jobs.export.hf_folder import export

        out = export(args.source, args.out, fmt=args.format, dtype=args.dtype, overwrite=args.overwrite,
                     allow_dropless=args.allow_dropless, max_shard_bytes=args.max_shard_size, layers=args.layers,
                     width_fraction=args.width_fraction)
        print(f"export: wrote {out}")
        return 0
    from rung.jobs.loading import load_run_config

    overrides = list(args.overrides)
    if getattr(args, "workers", None) is not None:
        overrides.append(f"train.workers={args.workers}")
    if args.command == "plan":
        overrides += plan_overrides(args)
    cfg = load_run_config(args.config, overrides)
    if args.command == "data":
        from rung.jobs.data.prepare import prepare_data

        if args.data_workers < 0:
            raise ConfigError("--workers", f"must be >= 0, got {args.data_workers}")
        data = prepare_data(cfg, workers=args.data_workers, address=args.address)
        held = data.validation
        print(f"data: {data.num_tokens:,} training tokens"
              + (f", {held['num_tokens']:,} validation tokens" if held else ", no validation split")
              + f", vocabulary {data.vocab_size}, in {data.path}")
    elif args.command == "sweep":
        from rung.jobs.experiments.grid import parse_grid
        from rung.jobs.experiments.sweep import run_sweep

        grids = dict(parse_grid(spec) for spec in args.grid)
        run_sweep(cfg, grids, [p for p in args.params.split(",") if p], args.widths, args.depths, args.experts,
                  args.seeds, args.out, address=args.address)
    elif args.command == "ladder":
        from rung.jobs.experiments.grid import number
        from rung.jobs.experiments.ladder import run_ladder

        if args.hparams_from:
            from rung.jobs.experiments.transfer import apply_transfer

            cfg, _ = apply_transfer(cfg, args.hparams_from)
        budgets = [number(t) for t in args.tokens.split(",") if t.strip()]
        run_ladder(cfg, args.widths, args.depths or [cfg.model.n_layers], args.experts, budgets, args.out,
                   address=args.address)
    elif args.command == "plan":
        return run_plan(args, cfg)
    elif args.command == "train":
        from rung.jobs.train.loop import train

        if args.hparams_from:
            from rung.jobs.experiments.transfer import apply_transfer

            cfg, record = apply_transfer(cfg, args.hparams_from)
            print(f"train: transferred {record['values']} from sweep {record['sweep_id']} "
                  f"(proxy width {record['proxy_shape']['width']}, depth {record['proxy_shape']['depth']})")

        rows = train(cfg, resume=args.resume, address=args.address,
                     transfer=record if args.hparams_from else None, restart=args.restart)
        val = rows[-1].get("val_loss")
        print(f"train: done, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f} after {rows[-1]['step']} steps"
              + (f", validation loss {val:.4f}" if val is not None else "") + f", run dir {cfg.out_dir}/{cfg.name}")
    elif args.command == "count":
        from rung.jobs.model.counting import count

        print(json.dumps(count(cfg.model, cfg.train.seq_len).as_dict(), indent=2))
    elif args.command == "coordcheck":
        from rung.jobs.experiments.coordcheck import run_coordcheck

        params = [p for p in args.params.split(",") if p]
        axis, sizes = ("depth", args.depths) if args.depths else ("width", args.widths or [32, 64, 128, 256, 512])
        run_coordcheck(cfg, params, axis, sizes, steps=args.steps, seeds=args.seeds, lr=args.lr, out_dir=args.out)
    return 0


def _pipeline_command(args: argparse.Namespace) -> int:
    from rung.jobs.loading import load_run_config
    from rung.jobs.pipeline import PipelineOptions, run_pipeline, serve_and_ask, stop, summary_text

    options = PipelineOptions(out=args.out, sweep_grid=args.sweep_grid, sweep_steps=args.sweep_steps,
                              target_width_factor=args.target_width_factor, workers=args.workers, host=args.host,
                              port=args.port, address=args.address, exit_after_smoke=args.exit)
    result = run_pipeline(load_run_config(args.config, args.overrides), options)
    server, url, answer = serve_and_ask(result["model_dir"], options)
    try:
        print(summary_text(result, url, answer), flush=True)
        if not args.exit:
            print("serving until Ctrl-C", flush=True)
            server.wait()
    finally:
        stop(server)
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    from rung.serving.config import serve_config

    settings = serve_settings(args)
    try:
        config = serve_config(settings)
    except ConfigError as err:
        raise flag_of(err) from None
    if args.tune:
        from rung.serving.worker.tuning import tune

        if not os.path.isdir(args.model_dir):
            raise RungError(f"model folder not found: {args.model_dir}")
        if config.engine.tensor_parallel_size > 1:
            raise ConfigError("--tune", "times one process's forward per split; run it without "
                              "--tensor-parallel-size")
        tune(args.model_dir, config.engine)
    elif args.ray:
        from rung.serving.deploy.ray_app import serve_on_ray

        placement = {"autoscaling": args.autoscale} if args.autoscale else {"num_replicas": args.replicas}
        serve_on_ray({**settings, **placement}, host=args.host, port=args.port, address=args.address)
    else:
        from rung.serving.api.server import serve

        try:
            serve(config, host=args.host, port=args.port)
        except ConfigError as err:  # a setting the model refuses at load (--group-size that divides no layer)
            raise flag_of(err) from None
    return 0


def _exported_run_validation_ids(model_dir: str, tokens: int):
    """`rung quantize`'s default calibration: the validation split of the run the folder was exported from (training
    knows where a run's data lives; serving's quantizer takes the ids)."""
    from rung.jobs.export.calibration import validation_ids

    return validation_ids(model_dir, tokens)


def _jobs_command(args: argparse.Namespace) -> int:
    from rung.platform import jobs_api

    if args.command == "submit":
        command = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
        env = dict(item.partition("=")[::2] for item in args.env)
        client, job_id = jobs_api.submit(command, args.address, args.working_dir, env, args.submission_id)
        print(f"submitted job {job_id}", flush=True)
        if args.no_wait:
            return 0
        final = jobs_api.follow(client, job_id, lambda text: print(text, end="", flush=True))
        print(f"job {job_id} {final}")
        return 0 if final == "SUCCEEDED" else 1
    if args.action == "list":
        for job in jobs_api.list_jobs(args.address):
            print(f"{job.submission_id}\t{job.status}\t{job.entrypoint}")
        return 0
    if not args.job_id:
        raise RungError(f"rung jobs {args.action} needs a job id")
    if args.action == "status":
        print(jobs_api.status(args.address, args.job_id))
    elif args.action == "logs":
        print(jobs_api.logs(args.address, args.job_id), end="")
    else:
        print("stopped" if jobs_api.stop(args.address, args.job_id) else "already finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
