"""One linear layer on this CPU (`make bench`): x [M, K] times a weight [N, K] at decode batch sizes, as rung's float
path computes it (oneDNN's packed GEMM, fp32 and bf16), as torch's weight-only int8 and int4 operators do (bf16
activations; fp32 ones are far slower), and as rung's integer kernel does (int8, and int4 read two to a byte), each as a ratio to
the fp32 GEMM measured in the same run (median of 5 alternating rounds). Why rung has its own kernel: at 32 rows the
float GEMM is bound by arithmetic, so fewer weight bytes alone do not help. Writes OUT/quantized_gemm.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from rung.serving.worker.ops import cpu_kernels  # noqa: E402
from rung.serving.worker.ops.cpu_ops import CpuKernelOps  # noqa: E402
from rung.serving.worker.quantization import quantize  # noqa: E402

SHAPES = [(1024, 1024), (3072, 1024), (4096, 4096), (11008, 4096)]  # (N, K)
ROWS = [1, 8, 32]


def seconds(call, repeats: int) -> float:
    call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats


def candidates(n: int, k: int, m: int) -> dict:
    weight, x = torch.randn(n, k), torch.randn(m, k)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight)
    half = torch.ops.mkldnn._reorder_linear_weight(weight.bfloat16())
    q8 = quantize(weight, 8)
    ops = CpuKernelOps()
    int8, int4 = ops.pack_linear(q8), ops.pack_linear(quantize(weight, 4, 128))
    x_half, scales_half = x.bfloat16(), q8.scales[:, 0].bfloat16()
    q4 = quantize(weight, 4, 128)  # torch's int4 layout: unsigned levels (q + 8), (scale, zero) per group
    torch_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q4.q + 8).to(torch.int32), 1)
    scale_zero = torch.stack([q4.scales, torch.zeros_like(q4.scales)], -1).transpose(0, 1).contiguous().bfloat16()
    return {"fp32 (oneDNN)": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
            "bf16 (oneDNN)": lambda: torch.ops.mkldnn._linear_pointwise(x_half, half, None, "none", [], ""),
            "torch int8 weight-only, bf16 x": lambda: torch.ops.aten._weight_int8pack_mm(x_half, q8.q, scales_half),
            "torch int4 weight-only, bf16 x": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                x_half, torch_int4, 128, scale_zero),
            "rung int8": lambda: ops.linear(x, int8, None), "rung int4": lambda: ops.linear(x, int4, None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench/out")
    args = parser.parse_args()
    if not cpu_kernels.loaded():
        parser.error("rung's CPU kernels are not built (make install builds them)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, k in SHAPES:
        for m in ROWS:
            calls = candidates(n, k, m)
            repeats = max(3, int(2e8 / (2 * n * k * m)))  # ~0.2 GFLOP of fp32 work per timing
            times: dict[str, list[float]] = {name: [] for name in calls}
            for round_ in range(5):
                for name in (calls if round_ % 2 == 0 else reversed(list(calls))):
                    times[name].append(seconds(calls[name], repeats))
            median = {name: statistics.median(t) for name, t in times.items()}
            row = {"n": n, "k": k, "m": m, "fp32_us": median["fp32 (oneDNN)"] * 1e6,
                   "speedup_vs_fp32": {name: median["fp32 (oneDNN)"] / t for name, t in median.items()}}
            rows.append(row)
            print(f"{n}x{k} M={m}: fp32 {row['fp32_us']:.0f} us; " + ", ".join(
                f"{name} {ratio:.2f}x" for name, ratio in row["speedup_vs_fp32"].items() if name != "fp32 (oneDNN)"),
                flush=True)
    record = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(),
              "rows": rows}
    (out / "quantized_gemm.json").write_text(json.dumps(record, indent=2))
    plot(rows, out / "quantized_gemm.png")
    print(f"bench: wrote {out}/quantized_gemm.json and quantized_gemm.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name in rows[0]["speedup_vs_fp32"] if name != "fp32 (oneDNN)"]
    labels = [f"{r['n']}x{r['k']}\nM={r['m']}" for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(names)
    for index, name in enumerate(names):
        ax.bar([i + index * width for i in range(len(rows))], [r["speedup_vs_fp32"][name] for r in rows], width,
               label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], labels, fontsize=7)
    ax.set_ylabel("speed-up over oneDNN fp32 (log)")
    ax.set_title("one linear layer, one thread: x [M, K] @ W.T", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
