"""Engine benchmarks (`make bench`): offline output tokens/s of rung's engine against transformers' `generate` in
static batches of 32 (padded) and against vLLM's CPU build (run from its own venv, when present), the overlap's
own effect (async scheduling and nano-batching off and on, offline and served from the engine process), and decode
step time against batch size with the share of the machine's measured matmul FLOP/s it reaches. All ratios come
from the same run on the same machine.

Workload (seeded): N requests, prompt lengths uniform in [16, 512], output lengths uniform in [16, 256], ignore-eos,
on a ~10M-parameter Llama folder and a tiny Mixtral folder made with transformers (random weights), fp32, one
torch thread for compute. Writes OUT/serve_engine.json and OUT/serve_engine.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from rung.platform.runtime import _measured_matmul_flops  # noqa: E402
from rung.serving.config import EngineConfig  # noqa: E402
from rung.serving.core.params import SamplingParams  # noqa: E402
from rung.serving.engine.async_engine import AsyncEngine  # noqa: E402
from rung.serving.engine.core import ProcessCore  # noqa: E402
from rung.serving.engine.engine import Engine  # noqa: E402
from rung.serving.engine.llm import LLM  # noqa: E402

VOCAB = 8192
# both engines schedule with the same limits: 64 running sequences and vLLM's CPU default of 4,096 tokens per step
# (rung's throughput is the same at 2,048 and 4,096; vLLM's falls by a tenth at 2,048)
MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS = 64, 4096


def make_models(root: Path) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    folders = {"llama-10m": (LlamaForCausalLM, LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=1024)),
        "mixtral-tiny": (MixtralForCausalLM, MixtralConfig(
            vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=1024))}
    out = {}
    for name, (cls, config) in folders.items():
        folder = root / name
        if not (folder / "config.json").is_file():
            cls(config).save_pretrained(folder)
        out[name] = folder
    return out


def workload(n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, VOCAB, int(rng.integers(16, 513))).tolist() for _ in range(n)]
    return prompts, [int(rng.integers(16, 257)) for _ in range(n)]


def rung_offline(folder: Path, prompts, outputs, nano_batches: int = 1,
                 async_scheduling: bool | None = None) -> float:
    llm = LLM(folder, max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
              nano_batches=nano_batches, async_scheduling=async_scheduling)
    started = time.perf_counter()
    for index, (prompt, length) in enumerate(zip(prompts, outputs)):
        llm.engine.add(f"r{index}", prompt, SamplingParams(max_tokens=length, temperature=0, ignore_eos=True))
    produced = 0
    while llm.engine.has_work:
        produced += len(llm.engine.step())
    assert produced == sum(outputs)
    return produced / (time.perf_counter() - started)


def rung_served(folder: Path, prompts, outputs, nano_batches: int, async_scheduling: bool) -> float:
    """Through the AsyncEngine with detokenization and the engine in its own process, as `rung serve` runs it."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(VOCAB)}, unk_token="t0")))
    core = ProcessCore(folder, EngineConfig(max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=MAX_NUM_BATCHED_TOKENS,
                                            nano_batches=nano_batches, async_scheduling=async_scheduling))
    params = [SamplingParams(max_tokens=o, temperature=0, ignore_eos=True) for o in outputs]

    async def main() -> float:
        served = AsyncEngine(core, tokenizer)
        served.start()
        started = time.perf_counter()

        async def one(prompt, p) -> None:
            async for _ in served.generate(prompt, p):
                pass

        await asyncio.gather(*[one(prompt, p) for prompt, p in zip(prompts, params)])
        elapsed = time.perf_counter() - started
        served.stop()
        return sum(outputs) / elapsed

    return asyncio.run(main())


def transformers_static(folder: Path, prompts, outputs, batch: int = 32) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    started = time.perf_counter()
    for first in range(0, len(prompts), batch):
        chunk, lengths = prompts[first:first + batch], outputs[first:first + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=max(lengths), min_new_tokens=max(lengths),
                           do_sample=False, pad_token_id=0)
    return sum(outputs) / (time.perf_counter() - started)


VLLM_SCRIPT = """
import json, sys, time
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
folder, path = sys.argv[1], sys.argv[2]
work = json.load(open(path))
llm = LLM(model=folder, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=1024,
          max_num_seqs=%d, max_num_batched_tokens=%d, seed=0)
params = [SamplingParams(max_tokens=o, ignore_eos=True, temperature=0, detokenize=False) for o in work["outputs"]]
started = time.perf_counter()
results = llm.generate([TokensPrompt(prompt_token_ids=p) for p in work["prompts"]], params, use_tqdm=False)
elapsed = time.perf_counter() - started
print("RESULT", json.dumps({"tokens_per_s": sum(len(r.outputs[0].token_ids) for r in results) / elapsed}))
"""


def vllm_offline(python: str, folder: Path, prompts, outputs, out: Path) -> dict:
    work = out / "workload.json"
    work.write_text(json.dumps({"prompts": prompts, "outputs": outputs}))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1", "OMP_NUM_THREADS": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "0"}
    script = VLLM_SCRIPT % (MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS)
    result = subprocess.run([python, "-c", script, str(folder), str(work)], capture_output=True, text=True,
                            env=env, timeout=3600)
    for line in result.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": (result.stderr or result.stdout)[-1500:]}


def median_decode_step(engine: Engine, batch: int, context: int) -> float:
    """Seconds of the median decode step of `batch` requests with `context`-token prompts (prefilled first, not
    timed), each decoding 8 tokens."""
    for index in range(batch):
        engine.add(f"b{batch}-{index}", list(range(1, context + 1)), SamplingParams(max_tokens=8, temperature=0,
                                                                                    ignore_eos=True))
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.waiting +
              engine.scheduler.running):
        engine.step()
    times = []
    while engine.has_work:
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def decode_step_times(folder: Path) -> list[dict]:
    """Forward + sampling of one decode token for each of B requests with 256-token contexts."""
    engine = Engine(folder, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096))
    spec = engine.spec
    flops_per_token = 2 * sum(t.numel() for n, t in engine.model.w.items() if n != "model.embed_tokens.weight")
    peak = _measured_matmul_flops("cpu", torch.float32)
    rows = []
    for batch in (1, 2, 4, 8, 16, 32, 64):
        step = median_decode_step(engine, batch, 256)
        attention = 4 * batch * 256 * spec.num_heads * spec.head_dim * spec.num_layers
        rows.append({"batch": batch, "step_ms": step * 1000,
                     "flops_fraction": (flops_per_token * batch + attention) / step / peak})
    return rows


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = [k for k in results["throughput"]]
    labels = sorted({label for v in results["throughput"].values() for label in v if isinstance(v[label], float)})
    for offset, label in enumerate(labels):
        left.bar([i + offset * 0.8 / len(labels) for i in range(len(names))],
                 [results["throughput"][n].get(label, 0) if isinstance(results["throughput"][n].get(label), float)
                  else 0 for n in names], width=0.8 / len(labels), label=label)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("output tokens/s")
    left.legend(fontsize=7)
    steps = results["decode_steps"]
    right.plot([r["batch"] for r in steps], [r["step_ms"] for r in steps], marker="o")
    right.set_xscale("log", base=2)
    right.set_xlabel("decode batch size")
    right.set_ylabel("step time (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlap-repeats", type=int, default=3, help="runs of each overlap setting (median)")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of a venv with vllm-cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = make_models(out / "models")
    prompts, outputs = workload(args.requests, args.seed)
    results: dict = {"requests": args.requests, "output_tokens": sum(outputs), "throughput": {}}
    for name, folder in models.items():
        row = {}
        print(f"bench: {name}: rung offline ...", flush=True)
        row["rung"] = rung_offline(folder, prompts, outputs)
        print(f"bench: {name}: transformers static batches of 32 ...", flush=True)
        row["transformers"] = transformers_static(folder, prompts, outputs)
        row["rung/transformers"] = row["rung"] / row["transformers"]
        if Path(args.vllm_python).exists():
            print(f"bench: {name}: vLLM (CPU build) ...", flush=True)
            vllm = vllm_offline(args.vllm_python, folder, prompts, outputs, out)
            if "tokens_per_s" in vllm:
                row["vllm"] = vllm["tokens_per_s"]
                row["rung/vllm"] = row["rung"] / row["vllm"]
            else:
                row["vllm_error"] = vllm["error"]
        else:
            row["vllm_error"] = f"{args.vllm_python} not found (make bench-vllm-venv)"
        results["throughput"][name] = row
        print(f"bench: {name}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k}: see JSON"
                                             for k, v in row.items()), flush=True)
    llama = models["llama-10m"]
    subset = (prompts[:64], outputs[:64])
    results["overlap"] = {}
    for repeat in range(args.overlap_repeats):  # alternated, so drift on a shared machine hits every row alike
        for label, measure in (
                ("offline, sync, 1 nano-batch", lambda: rung_offline(llama, *subset, 1, async_scheduling=False)),
                ("offline, async, 1 nano-batch", lambda: rung_offline(llama, *subset, 1, async_scheduling=True)),
                ("offline, async, 2 nano-batches", lambda: rung_offline(llama, *subset, 2, async_scheduling=True)),
                ("served, sync, 1 nano-batch", lambda: rung_served(llama, *subset, 1, async_scheduling=False)),
                ("served, async, 1 nano-batch", lambda: rung_served(llama, *subset, 1, async_scheduling=True))):
            results["overlap"].setdefault(label, []).append(measure())
    results["overlap"] = {label: statistics.median(runs) for label, runs in results["overlap"].items()}
    print("bench: overlap: " + ", ".join(f"{k} {v:.1f}" for k, v in results["overlap"].items()), flush=True)
    results["decode_steps"] = decode_step_times(llama)
    for row in results["decode_steps"]:
        print(f"bench: decode batch {row['batch']}: {row['step_ms']:.2f} ms/step, "
              f"{row['flops_fraction']:.1%} of measured matmul FLOP/s", flush=True)
    (out / "serve_engine.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "serve_engine.png")
    print(f"bench: wrote {out}/serve_engine.json and serve_engine.png")


if __name__ == "__main__":
    main()
