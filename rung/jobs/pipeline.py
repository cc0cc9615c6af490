"""`rung pipeline` (what `make run` runs): corpus → μP sweep on a proxy → transfer to a wider target trained by
DeepSpeed ZeRO-2 on Ray workers → Hugging Face export → `rung serve` → a chat completion through the OpenAI API.

Each stage records its completion, with the inputs it ran on, in OUT/stages.json (written atomically) only after its
artifacts are in place, so a re-run skips finished stages and an interrupted stage is resumed (training continues
from its last checkpoint) or redone (the sweep, the export) — never read half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rung.config import evolve, to_dict
from rung.errors import RungError
from rung.jobs.config import RunConfig, with_absolute_paths
from rung.jobs.data.prepare import prepare_data
from rung.jobs.experiments.shapes import reshape
from rung.jobs.run_dir import RunDir
from rung.platform.processes import wait_until_ready

SMOKE_QUESTION = "Write a Python function that adds two numbers."


@dataclass
class PipelineOptions:
    out: str = "runs/pipeline"
    sweep_grid: str = "lr=2^-9:2^-5:x2"
    sweep_steps: int = 100
    target_width_factor: int = 2  # the target is this many times the config's width
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    exit_after_smoke: bool = False


class Stages:
    """OUT/stages.json: stage name → the fingerprint of the inputs it completed with."""

    def __init__(self, out: Path):
        self.path = out / "stages.json"
        self.done = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def run(self, name: str, inputs: dict, work: Callable[[], dict], log=print) -> dict:
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
        record = self.done.get(name)
        if record and record["fingerprint"] == fingerprint:
            log(f"pipeline: {name}: cached ({record['summary']})")
            return record["result"]
        started = time.monotonic()
        result = work()
        summary = result.pop("summary")
        self.done[name] = {"fingerprint": fingerprint, "result": result, "summary": summary}
        partial = self.path.with_suffix(".tmp")
        partial.write_text(json.dumps(self.done, indent=2))
        os.replace(partial, self.path)
        log(f"pipeline: {name}: {summary} ({time.monotonic() - started:.0f} s)")
        return result


def pick_port(host: str, wanted: int, log=print) -> int:
    """`wanted` if it is free, else a free one (and say so)."""
    with socket.socket() as probe:
        try:
            probe.bind((host, wanted))
            return wanted
        except OSError:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    log(f"pipeline: port {wanted} on {host} is taken; serving on {port} instead")
    return port


def run_pipeline(cfg: RunConfig, options: PipelineOptions, log=print) -> dict:
    from rung.jobs.experiments.grid import parse_grid
    from rung.jobs.experiments.sweep import run_sweep
    from rung.jobs.experiments.transfer import apply_transfer
    from rung.jobs.export.hf_folder import export
    from rung.jobs.train.loop import train

    out = Path(options.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = with_absolute_paths(cfg)
    stages = Stages(out)
    width = cfg.model.d_model
    proxy_widths = [width // 2, width]

    def data_stage() -> dict:
        data = prepare_data(cfg, log)
        return {"summary": f"{data.num_tokens:,} tokens, vocabulary {data.vocab_size}"}

    stages.run("data", to_dict(cfg.data), data_stage, log)

    sweep_dir = out / "sweep"
    proxy = evolve(reshape(cfg, width=width, depth=cfg.model.n_layers, base_width=width // 2,
                           base_depth=cfg.model.n_layers),
                   {"train.steps": options.sweep_steps,
                    "train.warmup_steps": min(cfg.train.warmup_steps, options.sweep_steps // 5)})

    def sweep_stage() -> dict:
        grids = dict([parse_grid(options.sweep_grid)])
        summary = run_sweep(proxy, grids, [cfg.param.name], proxy_widths, None, None, 1, str(sweep_dir),
                            address=options.address, log=log)
        chosen = summary["transfer"].get(cfg.param.name)
        if chosen is None:
            raise RungError(f"every sweep run failed; see {sweep_dir}/results.jsonl")
        lr = chosen["values"]["train.lr"]
        spread = summary["spread_octaves"].get(cfg.param.name, {}).get("train.lr")
        return {"lr": lr, "plot": str(sweep_dir / "sweep.png"), "loss_used": summary["loss_used"],
                "summary": f"best LR {lr:.4g} at the proxy by {summary['loss_used']} loss" + (f", optimum spread {spread:.2f} octaves across "
                                                                f"widths {proxy_widths}" if spread is not None else "")}

    sweep = stages.run("sweep", {"config": to_dict(proxy), "grid": options.sweep_grid, "widths": proxy_widths},
                       sweep_stage, log)

    target = evolve(reshape(cfg, width=width * options.target_width_factor, depth=cfg.model.n_layers,
                            base_width=width // 2, base_depth=cfg.model.n_layers),
                    {"name": f"{cfg.name}-target", "out_dir": str(out / "runs"), "train.workers": options.workers,
                     "train.zero_stage": 2})
    target, record = apply_transfer(target, sweep_dir / "summary.json")

    def train_stage() -> dict:
        rows = train(target, resume=True, address=options.address, log=log, transfer=record)
        tail = rows[-max(len(rows) // 10, 1):]
        tokens_per_s = sum(r["tokens"] for r in tail) / sum(r["seconds"] for r in tail)
        val_loss = rows[-1].get("val_loss")
        return {"run_dir": str(RunDir.of(target).root), "loss": rows[-1]["loss"], "val_loss": val_loss,
                "tokens_per_s": tokens_per_s,
                "summary": f"width {target.model.d_model}, {options.workers} workers ZeRO-2, LR "
                           f"{target.train.lr:.4g} from the sweep: loss {rows[0]['loss']:.3f} -> "
                           f"{rows[-1]['loss']:.3f}" + (f", validation {val_loss:.3f}" if val_loss is not None
                                                       else "") + f", {tokens_per_s:,.0f} tokens/s"}

    trained = stages.run("train", {"config": to_dict(target)}, train_stage, log)

    model_dir = out / "model"

    def export_stage() -> dict:
        export(trained["run_dir"], str(model_dir), overwrite=True)
        return {"summary": f"Hugging Face folder {model_dir}"}

    stages.run("export", {"run": trained}, export_stage, log)
    return {"out": str(out), "sweep": sweep, "train": trained, "model_dir": str(model_dir)}


def serve_and_ask(model_dir: str, options: PipelineOptions, log=print) -> tuple[subprocess.Popen, str, str]:
    """Start `rung serve` on the model, wait until ready, and ask it one chat question via the OpenAI SDK."""
    import openai

    port = pick_port(options.host, options.port, log)
    url = f"http://{options.host}:{port}"
    server = subprocess.Popen([sys.executable, "-m", "rung.cli", "serve", model_dir, "--host", options.host,
                               "--port", str(port), "--served-model-name", "rung-pipeline"],
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wait_until_ready(server, f"{url}/v1/models", 180, "rung serve")  # kills it on failure
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model="rung-pipeline", messages=[{"role": "user",
                                                                             "content": SMOKE_QUESTION}],
                                            max_tokens=48, temperature=0.8, seed=0).choices[0].message.content
    return server, url, answer


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def summary_text(result: dict, url: str, answer: str) -> str:
    sweep, trained = result["sweep"], result["train"]
    val_loss = trained.get("val_loss")
    validation = "no validation split" if val_loss is None else f"validation {val_loss:.4f}"
    return f"""
rung pipeline — done
  sweep:     {sweep['plot']} (chosen LR {sweep['lr']:.4g}, by {sweep.get('loss_used', 'training')} loss)
  target:    loss {trained['loss']:.4f}, {validation}, {trained['tokens_per_s']:,.0f} tokens/s  ({trained['run_dir']})
  model:     {result['model_dir']}
  endpoint:  {url}/v1   (model "rung-pipeline")
  metrics:   {url}/metrics
  answer:    {answer!r}

  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "rung-pipeline", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 32}}'

  python -c "import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='-'); print(c.chat.completions.create(\\
model='rung-pipeline', messages=[{{'role': 'user', 'content': 'Hello'}}], max_tokens=32).choices[0].message.content)"
"""
