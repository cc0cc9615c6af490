"""Low-bit serving weights on this CPU (`make bench`): per model and scheme (fp32, bf16, int8, int4; the last two
also with the readout quantized, `--quantize-lm-head`), decode output tokens/s at concurrency 32 and what it costs
in quality, all in one run.

- Speed: 32 requests of 32-token prompts prefilled (not timed), then every decode step timed until each has 128
  tokens (fewer where the model's context is shorter: the tiny models' 128 leave 96); output tokens/s of the decode
  phase. Schemes alternate within each repeat; the median of the repeats.
- Quality (trained models only): `rung eval`'s perplexity on held-out Python source (files of an installed package
  the built-in corpus, the standard library, does not hold), and greedy agreement: the fp32 model's greedy
  continuation of 32 held-out prompts (as many tokens as above), fed to each scheme, which predicts every next token
  (teacher-forced, so one early difference does not decide the rest).
- Bytes: every weight as the engine holds it (int4 at half a byte per weight on the kernels' paths, with scales).
- Same size: on trained models, `rung quantize`'s mixed folder at the bits of int4 in half-size groups (4.5 bits per
  weight where the groups are 128: int4 in groups of 64), calibrated on the exporting run's validation split (not
  the text perplexity is measured on), against that uniform int4.

Models: trained rung folders given with --trained (the pipeline's export, `make run`), and random-weight shapes of the
serving matrix (`serve_matrix.SHAPES`) for speed. int4's group is the largest of 128, 64, 32, 16 dividing every
projection's input. Writes OUT/quantization.json and OUT/quantization.png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from rung.serving.config import EngineConfig  # noqa: E402
from rung.serving.core.params import SamplingParams  # noqa: E402
from rung.serving.engine.engine import Engine  # noqa: E402
from rung.serving.model_tools.perplexity import (evaluate, prefill, read_documents, token_windows,  # noqa: E402
                                                 window_cache)
from rung.serving.worker.runner import load_model  # noqa: E402

SCHEMES = {"fp32": {}, "bf16": {"dtype": "bfloat16"}, "int8": {"quantization": "int8"},
           "int4": {"quantization": "int4"},
           "int8+head": {"quantization": "int8", "quantize_lm_head": True},  # the readout too (--quantize-lm-head)
           "int4+head": {"quantization": "int4", "quantize_lm_head": True}}
# decode speed-up over fp32 and perplexity increase at most, per scheme (with the readout float and quantized)
GOALS = {"int8": (1.5, 0.01), "int4": (2.0, 0.05), "int8+head": (1.5, 0.01), "int4+head": (2.0, 0.05)}
CONCURRENCY, PROMPT = 32, 32  # requests, prompt tokens each; outputs of 128 tokens, or what the context leaves
CALIBRATION_TOKENS = 16384
HELD_OUT_PACKAGE = "transformers/utils"  # Python source the built-in corpus (the standard library) does not hold


def group_size(folder: Path) -> int:
    config = json.loads((folder / "config.json").read_text())
    inputs = {config["hidden_size"], config["intermediate_size"], config.get("shared_intermediate_size") or 128,
              config["num_attention_heads"] * (config.get("head_dim") or config["hidden_size"]
                                               // config["num_attention_heads"])}
    return next(g for g in (128, 64, 32, 16) if all(n % g == 0 for n in inputs))


def output_tokens(folder: Path) -> int:
    return min(128, json.loads((folder / "config.json").read_text())["max_position_embeddings"] - PROMPT)


def engine_config(scheme: str, group: int) -> EngineConfig:
    return EngineConfig(max_num_seqs=CONCURRENCY, max_num_batched_tokens=4096, quantization_group_size=group,
                        **SCHEMES[scheme])


def decode_tokens_per_s(folder: Path, config: EngineConfig, vocab: int) -> float:
    engine = Engine(folder, config)
    generator = torch.Generator().manual_seed(0)
    for index in range(CONCURRENCY):
        prompt = torch.randint(1, vocab, (PROMPT,), generator=generator).tolist()
        engine.add(f"r{index}", prompt, SamplingParams(max_tokens=output_tokens(folder), temperature=0,
                                                       ignore_eos=True))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.waiting +
              engine.scheduler.running):
        engine.step()
    steps, started = 0, time.perf_counter()
    while engine.has_work:
        engine.step()
        steps += 1
    elapsed = time.perf_counter() - started
    engine.close()
    return CONCURRENCY * steps / elapsed


def held_out_text(out: Path, max_bytes: int = 400_000) -> Path:
    import transformers

    root = Path(transformers.__file__).parent.parent / HELD_OUT_PACKAGE
    path, documents, size = out / "held_out.jsonl", [], 0
    for file in sorted(root.glob("*.py")):
        text = file.read_text(encoding="utf-8")
        documents.append(json.dumps({"text": text}))
        size += len(text)
        if size >= max_bytes:
            break
    path.write_text("\n".join(documents) + "\n")
    return path


Variant = tuple[Path, EngineConfig]  # a folder and how the engine loads it


def variants(folder: Path, trained: bool, out: Path) -> dict[str, Variant]:
    """fp32, bf16, int8, int4 (groups of g); for trained models also a same-size pair: `rung quantize`'s mixed folder
    at the bits of int4 in groups of g / 2 (4.5 for g = 128), calibrated on the exporting run's validation split,
    against that uniform int4."""
    group = group_size(folder)
    named = {scheme: (folder, engine_config(scheme, group)) for scheme in SCHEMES}
    if trained:
        from rung.jobs.export.calibration import validation_ids
        from rung.serving.model_tools.quantize import bits_per_weight, quantize_folder

        budget = bits_per_weight(4, 0, group // 2)
        mixed = out / "models" / f"{folder.parent.name}-mixed-{budget:g}"
        if not (mixed / "config.json").is_file():
            quantize_folder(str(folder), str(mixed), budget, validation_ids(folder, CALIBRATION_TOKENS), group,
                            CALIBRATION_TOKENS, overwrite=True)
        named[f"mixed-{budget:g}"] = (mixed, EngineConfig(max_num_seqs=CONCURRENCY, max_num_batched_tokens=4096))
        named[f"int4-g{group // 2}"] = (folder, engine_config("int4", group // 2))
    return named


@torch.inference_mode()
def greedy_agreement(folder: Path, named: dict[str, Variant], data: Path) -> dict[str, float]:
    """Per variant, the share of the fp32 model's greedy tokens it predicts, teacher-forced."""
    from rung.serving.api.state import load_tokenizer
    from rung.serving.engine.llm import LLM

    windows = token_windows(load_tokenizer(str(folder)), read_documents(data), PROMPT, None)[:CONCURRENCY]
    prompts, output = [w.tolist() for w in windows], output_tokens(folder)
    reference = LLM(*named["fp32"]).generate(prompts, SamplingParams(max_tokens=output, temperature=0,
                                                                     ignore_eos=True))
    sequences = [torch.tensor(p + r[0].token_ids) for p, r in zip(prompts, reference)]
    agreement = {}
    for name, (variant_folder, config) in named.items():
        model = load_model(variant_folder, config)
        cache = window_cache(model, PROMPT + output)
        same = 0
        for sequence in sequences:
            predicted = model.logits(prefill(model, sequence, cache)[PROMPT - 1:-1]).argmax(-1)
            same += int((predicted == sequence[PROMPT:]).sum())
        agreement[name] = same / (len(sequences) * output)
    return agreement


def measure(folder: Path, trained: bool, repeats: int, data: Path, out: Path) -> dict:
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    named = variants(folder, trained, out)
    speeds: dict[str, list[float]] = {name: [] for name in named}
    for repeat in range(repeats):
        order = list(named) if repeat % 2 == 0 else list(reversed(named))
        for name in order:
            speeds[name].append(decode_tokens_per_s(*named[name], vocab))
            print(f"  {folder.parent.name}/{folder.name} {name} repeat {repeat + 1}/{repeats}: "
                  f"{speeds[name][-1]:,.0f} tok/s", flush=True)
    result = {"group_size": group_size(folder), "trained": trained, "output_tokens": output_tokens(folder),
              "schemes": {}}
    for name, (variant_folder, config) in named.items():
        result["schemes"][name] = {"decode_tokens_per_s": statistics.median(speeds[name]), "runs": speeds[name],
                                   "weight_bytes": load_model(variant_folder, config).weight_bytes}
    fp32 = result["schemes"]["fp32"]["decode_tokens_per_s"]
    for row in result["schemes"].values():
        row["speedup_vs_fp32"] = row["decode_tokens_per_s"] / fp32
    if trained:
        for name, (variant_folder, config) in named.items():
            result["schemes"][name]["perplexity"] = evaluate(str(variant_folder), str(data), config)["perplexity"]
        base = result["schemes"]["fp32"]["perplexity"]
        for row in result["schemes"].values():
            row["perplexity_delta"] = row["perplexity"] / base - 1
        for name, share in greedy_agreement(folder, named, data).items():
            result["schemes"][name]["greedy_agreement"] = share
    return result


def goals(results: dict) -> list[dict]:
    rows = []
    for name, model in results["models"].items():
        for scheme, (speedup, quality) in GOALS.items():
            row = model["schemes"][scheme]
            rows.append({"model": name, "scheme": scheme, "speedup": row["speedup_vs_fp32"], "speedup_goal": speedup,
                         "perplexity_delta": row.get("perplexity_delta"), "perplexity_goal": quality,
                         "met": row["speedup_vs_fp32"] >= speedup and (row.get("perplexity_delta") is None
                                                                       or row["perplexity_delta"] <= quality)})
        mixed = next((key for key in model["schemes"] if key.startswith("mixed-")), None)
        if mixed is not None:
            uniform = f"int4-g{model['group_size'] // 2}"
            rows.append({"model": name, "scheme": f"{mixed} vs {uniform} (the same bits)",
                         "perplexity": model["schemes"][mixed]["perplexity"],
                         "uniform_perplexity": model["schemes"][uniform]["perplexity"],
                         "met": model["schemes"][mixed]["perplexity"] < model["schemes"][uniform]["perplexity"]})
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"])
    fig, (speed, quality) = plt.subplots(1, 2, figsize=(12, 4))
    names = list(dict.fromkeys(n for m in models for n in results["models"][m]["schemes"]))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        xs = [m + index * width for m in range(len(models))]
        rows = [results["models"][m]["schemes"].get(name, {}) for m in models]
        speed.bar(xs, [row.get("speedup_vs_fp32", float("nan")) for row in rows], width, label=name)
        quality.bar(xs, [100 * row.get("perplexity_delta", float("nan")) for row in rows], width, label=name)
    for axis, title in ((speed, f"decode tokens/s at concurrency {CONCURRENCY}, ÷ fp32"),
                        (quality, "perplexity increase over fp32 (%), trained models")):
        axis.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models, fontsize=7, rotation=10)
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    from serve_matrix import make_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", action="append", default=[], metavar="FOLDER",
                        help="a trained rung model folder (repeatable), e.g. runs/pipeline/model")
    parser.add_argument("--shapes", default="hd64-gqa8-v32k-l12,hd64-gqa3-v16k-l8",
                        help="serving-matrix shapes with random weights, for speed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = held_out_text(out)
    folders = {Path(f).resolve().parent.name + "/" + Path(f).name: (Path(f), True) for f in args.trained}
    folders.update({name: (make_folder(out / "models", name), False) for name in args.shapes.split(",") if name})
    results = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
               "concurrency": CONCURRENCY, "prompt_tokens": PROMPT, "models": {}}
    for name, (folder, trained) in folders.items():
        print(f"bench: {name}", flush=True)
        results["models"][name] = measure(folder, trained, args.repeats, data, out)
    results["goals"] = goals(results)
    (out / "quantization.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "quantization.png")
    for row in results["goals"]:
        if "uniform_perplexity" in row:
            figures = f"perplexity {row['perplexity']:.3f} vs {row['uniform_perplexity']:.3f}"
        else:
            figures = f"{row['speedup']:.2f}x fp32" + ("" if row["perplexity_delta"] is None else
                                                       f", perplexity {100 * row['perplexity_delta']:+.2f} %")
        print(f"{row['model']} {row['scheme']}: {figures} — goal {'met' if row['met'] else 'missed'}")
    print(f"bench: wrote {out}/quantization.json and quantization.png")


if __name__ == "__main__":
    main()
