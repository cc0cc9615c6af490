"""The prepared GPU serving check (issue: rung's engine on NVIDIA GPUs), one command for a lent H100/H200, under 8
minutes: rung's engine (its Triton paged attention, `--attention-backend auto`) on a ~1B-parameter random Llama
(d_model 2048, 16 layers, GQA 4:1, head dim 128, bf16) and a routed MoE (Mixtral-shaped, 8 experts, top-2):

- 256 requests (prompts 128-2,048 tokens, outputs 128-512) through rung's offline engine, and the same requests
  through transformers' `generate` in static batches of 32 (SDPA), output tokens/s each; vLLM's `LLM` too where it
  is installed;
- decode step time against batch size (1-256, 512-token contexts) beside the HBM roofline: bytes of weights and KV
  read per step over the card's bandwidth, measured in the same run with a device-to-device copy — with CUDA graphs
  (the default) and without (`enforce_eager`);
- nano-batching off and on (1 and 2 nano-batches) on the MoE, on a quarter of its requests;
- the dense model's weights as int8 and int4 (`--quantization`, Triton's weight-only GEMM) against bf16, output
  tokens/s on a quarter of its requests;
- where several GPUs are present: the dense model split over 2, 4, ... of them (`--tensor-parallel-size`, NCCL),
  with two nano-batches whose all-reduces overlap the other's compute and, for the largest split, without
  (`--no-overlap-collectives`), on a quarter of its requests (in --smoke: over two CPU processes).

The engines size their KV pool from the device (`gpu_memory_utilization`, the default 0.9), so the run exercises
the profiling too. Writes OUT/gpu_serve.json and OUT/gpu_serve.png naming the card. `--smoke` runs every part on
tiny shapes on a CPU (the torch path, where graphs are off) in about a minute, to check the plumbing.

On the lent device machine (torch and Triton present, nothing fetchable), carry the wheels rung's engine and this
script import beside them — `pip download --no-deps --only-binary :all: --python-version 3.12 -d .whl transformers
tokenizers safetensors huggingface-hub llguidance` here — install them with `--target /tmp/site`, then:
`PYTHONPATH=/tmp/site:. python3 bench/gpu_serve.py --out $OUT`.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from serve_engine import median_decode_step  # noqa: E402

SHAPES = {  # name: (transformers family, config)
    "llama-1b": ("Llama", dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                               num_attention_heads=16, num_key_value_heads=4, head_dim=128)),
    "moe-8x": ("Mixtral", dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                               num_attention_heads=8, num_key_value_heads=2, num_local_experts=8,
                               num_experts_per_tok=2)),
}
SMOKE = {"llama-1b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=512),
         "moe-8x": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512)}


def make_model(root: Path, name: str, smoke: bool) -> Path:
    import transformers

    family, config = SHAPES[name]
    config = {**config, **(SMOKE[name] if smoke else {}), "max_position_embeddings": 4096,
              "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    folder = root / name
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = getattr(transformers, f"{family}ForCausalLM")(getattr(transformers, f"{family}Config")(**config))
        model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(folder)
    return folder


def workload(vocab: int, count: int, smoke: bool, seed: int = 0) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    prompt_range, output_range = ((8, 64), (8, 32)) if smoke else ((128, 2048), (128, 512))
    return [([rng.randrange(1, vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*output_range))
            for _ in range(count)]


def release_memory() -> None:
    """Let the next engine have the device memory the last one held."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_rung(folder: Path, requests, dtype: str, nano_batches: int | None = None, **settings) -> float:
    """Output tokens/s of rung's offline engine on `requests` (prompt, output length), all submitted at once;
    `settings`: more engine settings (quantization)."""
    from rung.serving.core.params import SamplingParams
    from rung.serving.engine.llm import LLM

    release_memory()
    llm = LLM(folder, dtype=dtype, max_num_seqs=256, max_num_batched_tokens=8192,
              kv_cache_memory=None if torch.cuda.is_available() else 1 << 30, nano_batches=nano_batches, **settings)
    engine = llm.engine
    for index, (prompt, output) in enumerate(requests):
        engine.add(f"r{index}", prompt, SamplingParams(max_tokens=output, temperature=0, ignore_eos=True))
    started, produced = time.perf_counter(), 0
    while engine.has_work:
        produced += len(engine.step())
    rate = produced / (time.perf_counter() - started)
    llm.close()
    return rate


def run_transformers(folder: Path, requests, batch: int = 32) -> float:
    """Output tokens/s of transformers' generate in static batches (left-padded), SDPA attention."""
    import transformers

    release_memory()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").to(device).eval()
    started, produced = time.perf_counter(), 0
    for first in range(0, len(requests), batch):
        group = requests[first:first + batch]
        width, new = max(len(p) for p, _ in group), max(n for _, n in group)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group], device=device)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=0)
        produced += sum(n for _, n in group)  # the tokens each request asked for; the padding rows are waste
    return produced / (time.perf_counter() - started)


def run_vllm(folder: Path, requests) -> float | None:
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except ImportError:
        return None
    llm = LLM(str(folder), dtype="bfloat16", max_model_len=4096)
    started = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p, _ in requests],
                           [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests])
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started)


def bandwidth() -> float:
    """Device memory bandwidth in bytes/s: a 1 GiB device-to-device copy (read + write)."""
    if not torch.cuda.is_available():
        return float("nan")
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize()
    return 2 * 10 * source.numel() / (time.perf_counter() - started)


def decode_steps(folder: Path, dtype: str, batches: list[int], context: int, bytes_per_s: float) -> list[dict]:
    """Median decode step time per batch size with CUDA graphs and eagerly, and the roofline: weights + every
    context's KV read once a step (NaN without a GPU to measure the bandwidth of)."""
    from rung.serving.config import EngineConfig
    from rung.serving.engine.engine import Engine

    rows = [{"batch": batch} for batch in batches]
    for eager in (False, True):
        release_memory()
        engine = Engine(folder, EngineConfig(dtype=dtype, max_num_seqs=max(batches), max_num_batched_tokens=8192,
                                             kv_cache_memory=None if torch.cuda.is_available() else 1 << 30,
                                             enforce_eager=eager))
        spec = engine.spec
        weight_bytes = sum(t.numel() * t.element_size() for t in engine.model.w.values())
        kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * engine.runner.cache.element_size()
        for row in rows:
            step = median_decode_step(engine, row["batch"], context)
            roofline = (weight_bytes + row["batch"] * context * kv_per_token) / bytes_per_s
            row.update({"step_ms_eager": step * 1e3} if eager else
                       {"step_ms": step * 1e3, "roofline_ms": roofline * 1e3, "fraction_of_roofline": roofline / step,
                        "cuda_graphs": engine.runner.graphs is not None, "kv_blocks": engine.runner.num_blocks})
        del engine
    for row in rows:
        row["graphs_speedup"] = row["step_ms_eager"] / row["step_ms"]
    return rows


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = [(f"{shape} {engine}", value) for shape, rates in record["throughput"].items()
            for engine, value in rates.items() if value]
    left.barh([b[0] for b in bars][::-1], [b[1] for b in bars][::-1])
    left.set_xlabel("output tokens/s")
    steps = record["decode_steps"]
    right.plot([r["batch"] for r in steps], [r["step_ms"] for r in steps], marker="o", label="rung, CUDA graphs")
    right.plot([r["batch"] for r in steps], [r["step_ms_eager"] for r in steps], marker="x", label="rung, eager")
    right.plot([r["batch"] for r in steps], [r["roofline_ms"] for r in steps], linestyle="--", label="HBM roofline")
    right.set_xscale("log", base=2)
    right.set_xlabel("decode batch (512-token contexts)")
    right.set_ylabel("step ms")
    right.legend()
    fig.suptitle(f"rung serving on {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/out")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on a CPU, to check the plumbing")
    args = parser.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: this is the GPU check (--smoke runs its plumbing on a CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    count, batches = (16, [1, 4, 16]) if args.smoke else (256, [1, 8, 32, 64, 128, 256])
    record = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "throughput": {},
              "nano_batches": {}}
    for name in SHAPES:
        folder = make_model(out / "gpu-serve-models", name, args.smoke)
        requests = workload(SHAPES[name][1]["vocab_size"] if not args.smoke else 512, count, args.smoke)
        rates = record["throughput"][name] = {"rung": run_rung(folder, requests, dtype),
                                              "transformers": run_transformers(folder, requests[:64]),
                                              "vllm": run_vllm(folder, requests)}
        print(f"{name}: " + ", ".join(f"{k} {v:,.0f} tokens/s" for k, v in rates.items() if v), flush=True)
        if name == "llama-1b":  # int8 / int4 weights on Triton's quantized GEMM, a quarter of the requests
            group = 16 if args.smoke else 128  # the smoke model's layers are 64 wide
            record["quantization"] = {scheme: run_rung(folder, requests[:count // 4], dtype, quantization=scheme,
                                                       quantization_group_size=group)
                                      for scheme in ("none", "int8", "int4")}
            print(f"{name} quantization none / int8 / int4: {record['quantization']}", flush=True)
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 2
            sizes = [n for n in (2, 4, 8) if n <= gpus]
            if sizes:  # tensor parallelism across the GPUs present
                quarter = requests[:count // 4]
                runs = {"tp1": run_rung(folder, quarter, dtype, nano_batches=2)}
                runs.update({f"tp{n}": run_rung(folder, quarter, dtype, nano_batches=2, tensor_parallel_size=n)
                             for n in sizes})
                runs[f"tp{sizes[-1]}-serial"] = run_rung(folder, quarter, dtype, nano_batches=2,
                                                         tensor_parallel_size=sizes[-1], overlap_collectives=False)
                record["tensor_parallel"] = runs
                print(f"{name} tensor parallel (tokens/s): {runs}", flush=True)
        if name == "moe-8x":  # a quarter of the requests: the comparison, not the total, is what counts here
            record["nano_batches"] = {str(n): run_rung(folder, requests[:count // 4], dtype, nano_batches=n)
                                      for n in (1, 2)}
            print(f"{name} nano-batches 1 / 2: {record['nano_batches']}", flush=True)
        (out / "gpu_serve.json").write_text(json.dumps(record, indent=2))
    record["bandwidth_bytes_per_s"] = bytes_per_s = bandwidth()
    record["decode_steps"] = decode_steps(out / "gpu-serve-models" / "llama-1b", dtype, batches,
                                          32 if args.smoke else 512, bytes_per_s)
    for row in record["decode_steps"]:
        print(f"decode batch {row['batch']}: {row['step_ms']:.2f} ms (eager {row['step_ms_eager']:.2f} ms, graphs "
              f"{row['graphs_speedup']:.2f}x), roofline {row['roofline_ms']:.2f} ms ({row['fraction_of_roofline']:.0%})",
              flush=True)
    (out / "gpu_serve.json").write_text(json.dumps(record, indent=2))
    plot(record, out / "gpu_serve.png")
    print(f"wrote {out}/gpu_serve.json and gpu_serve.png ({device})")


if __name__ == "__main__":
    main()
