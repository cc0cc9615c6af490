"""Train once, serve many sizes: validation loss and serving throughput of the cuts of one run, against models of
the same shapes trained alone on the same tokens.

Two parents of the same shape train side by side, one with `train.layerdrop` and one without; then every depth cut
(`rung export --layers`: the first half, every other layer, one layer) and the half-width cut of each is scored on
the run's validation split, beside a model of each cut's shape trained alone for as many steps. Each cut is also
exported and served by rung's engine (decode tokens/s, 16 prompts at once).

Writes OUT/elastic.json and OUT/elastic.png (validation loss against parameters, one curve per kind of model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from rung.config import evolve  # noqa: E402
from rung.jobs.config import RunConfig  # noqa: E402
from rung.jobs.data.loader import ValidationSet  # noqa: E402
from rung.jobs.data.prepare import prepare_data  # noqa: E402
from rung.jobs.export.hf_folder import export, find_checkpoint  # noqa: E402
from rung.jobs.loading import load_run_config  # noqa: E402
from rung.jobs.model.build import build_model  # noqa: E402
from rung.jobs.model.counting import count  # noqa: E402
from rung.jobs.model.cuts import kept_layers, width_cut  # noqa: E402
from rung.jobs.run_dir import RunDir  # noqa: E402
from rung.jobs.train.evaluate import evaluate  # noqa: E402
from rung.jobs.train.loop import train  # noqa: E402
from rung.platform.progress import Progress  # noqa: E402

REPEATS = 3  # decode runs per folder; the median is reported


@dataclass
class Forward:
    """What `evaluate` calls, without DeepSpeed: `model` through `layers` only."""

    module: torch.nn.Module
    layers: list[int] | None
    device = torch.device("cpu")

    def train_micro_batch_size_per_gpu(self) -> int:
        return 8

    def __call__(self, inputs: torch.Tensor):
        return self.module(inputs, layers=self.layers)


def trained(cfg: RunConfig) -> torch.nn.Module:
    ck = find_checkpoint(RunDir.of(cfg).root)
    model, _ = build_model(RunConfig(model=ck.model, param=ck.param, data=cfg.data))
    model.load_state_dict(load_file(str(ck.path / "model.safetensors")), strict=False)
    return model.eval()


def silenced(model: torch.nn.Module, fraction: float) -> torch.nn.Module:
    """`model` computing its width cut: the other heads' and units' output columns zeroed (tests/test_export.py)."""
    cut = width_cut(model.cfg, fraction)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("o_proj.weight"):
                tensor[:, cut.n_heads * cut.resolved_head_dim:] = 0
            elif name.endswith("down_proj.weight"):
                tensor[:, cut.ffn_hidden:] = 0
    return model


def decode_rate(folder: Path) -> float:
    from rung.serving.core.params import SamplingParams
    from rung.serving.engine.llm import LLM

    prompts = [[(7 * i + j) % 200 + 3 for j in range(16)] for i in range(16)]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    llm = LLM(folder, num_blocks=512, block_size=16)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    rates = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        outputs = llm.generate(prompts, params)
        rates.append(sum(len(o[0].token_ids) for o in outputs) / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--layerdrop", type=float, default=0.5)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_run_config("tiny", [f"out_dir={out / 'elastic_runs'}", f"train.steps={args.steps}",
                                    f"model.n_layers={args.depth}", "param.name=completep", "param.base_depth=1",
                                    "train.eval_every=0",
                                    "train.log_every=100"])
    depth_cuts = {"first-half": str(args.depth // 2), "every-2": "every-2", "1": "1"}
    depths = {cut: len(kept_layers(spec, args.depth)) for cut, spec in depth_cuts.items()}
    shapes = {"parent-layerdrop": {"train.layerdrop": args.layerdrop}, "parent-whole": {}}
    for depth in sorted(set(depths.values())):
        shapes[f"alone-depth-{depth}"] = {"model.n_layers": depth}
    half = width_cut(base.model, 0.5)
    shapes["alone-half-width"] = {"model.n_heads": half.n_heads, "model.n_kv_heads": half.n_kv_heads,
                                  "model.head_dim": half.head_dim, "model.ffn_mult": half.ffn_mult,
                                  "model.ffn_multiple_of": 1}
    configs = {name: evolve(base, {"name": name, **changes}) for name, changes in shapes.items()}
    progress = Progress("elastic: train", len(configs), "runs")
    for index, cfg in enumerate(configs.values(), 1):
        train(cfg, log=lambda _: None, restart=True)  # a rerun of the benchmark trains again
        print(progress.line(index, index), flush=True)
    validation = ValidationSet(prepare_data(base, log=lambda _: None), base.train.seq_len, base.train.global_batch,
                               base.train.eval_batches, base.train.seed)

    def score(model: torch.nn.Module, layers: list[int] | None = None) -> float:
        return evaluate(Forward(model, layers), validation, 0, 1)

    rows = []
    for parent in ("parent-layerdrop", "parent-whole"):
        run = RunDir.of(configs[parent]).root
        export(run, out / "elastic_cuts" / parent, overwrite=True)
        rows.append({"model": parent, "cut": "whole", "params": count(base.model, 1).total_params,
                     "val_loss": score(trained(configs[parent])),
                     "decode_tokens_per_s": decode_rate(out / "elastic_cuts" / parent)})
        for cut, spec in [*depth_cuts.items(), ("half-width", None)]:
            folder = out / "elastic_cuts" / f"{parent}-{cut}"
            if spec is None:
                model, loss = width_cut(base.model, 0.5), score(silenced(trained(configs[parent]), 0.5))
                export(run, folder, width_fraction=0.5, overwrite=True)
            else:
                layers = kept_layers(spec, args.depth)
                model = evolve(base.model, {"n_layers": len(layers)})
                loss = score(trained(configs[parent]), layers)
                export(run, folder, layers=spec, overwrite=True)
            rows.append({"model": parent, "cut": cut, "params": count(model, 1).total_params, "val_loss": loss,
                         "decode_tokens_per_s": decode_rate(folder)})
    for name, cfg in configs.items():
        if name.startswith("alone-"):
            rows.append({"model": "trained alone", "cut": name.removeprefix("alone-"),
                         "params": count(cfg.model, 1).total_params, "val_loss": score(trained(cfg))})
    for row in rows:
        print(f"elastic: {row['model']:<16} {row['cut']:<10} {row['params']:>9,} params  val {row['val_loss']:.4f}"
              + (f"  {row['decode_tokens_per_s']:,.0f} tok/s" if "decode_tokens_per_s" in row else ""))
    record = {"machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
              "steps": args.steps, "depth": args.depth, "layerdrop": args.layerdrop, "rows": rows}
    (out / "elastic.json").write_text(json.dumps(record, indent=2))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("parent-layerdrop", "o"), ("parent-whole", "s"), ("trained alone", "^")):
        points = sorted((r["params"], r["val_loss"], r["cut"]) for r in rows if r["model"] == kind)
        axes.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle="none", label=kind)
        for x, y, cut in points:
            axes.annotate(cut, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axes.set(xscale="log", xlabel="parameters", ylabel="validation loss",
             title=f"cuts of one run vs trained alone ({args.steps} steps, LayerDrop {args.layerdrop:g})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "elastic.png", dpi=120)
    print(f"elastic: wrote {out / 'elastic.json'} and {out / 'elastic.png'}")


if __name__ == "__main__":
    main()
