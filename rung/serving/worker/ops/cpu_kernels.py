"""rung's compiled CPU kernels (`csrc/`): attention for every decoding request of a step in one call and for every
prefill chunk in another, the writes of a step's keys and values into the paged pool, the layers' RMSNorm,
rotary embedding and SwiGLU activation in one pass each, and linear layers over int8 and int4 weights.

Why: a decode's attention in PyTorch is three small operators per layer per request, a prefill chunk's a Python
loop over tiles that materialises every score, and RMSNorm, RoPE and SwiGLU are several passes over the hidden
states each; on a CPU that is per-operator dispatch and memory traffic the
arithmetic does not need. vLLM's CPU backend has the same ops in C++.

`make install` builds them (`python -m rung.serving.worker.ops.cpu_kernels`) with torch's extension builder into
rung's cache (`rung.platform.paths.cache_dir("kernels")`, outside the package tree), in a folder keyed by the
sources' hash, torch's version and the compiler flags, so a stale or foreign build is never loaded; the engine only
loads what is there and never compiles at serve time. Without a build, or with RUNG_KERNELS=0, the engine runs the
PyTorch ops (`torch_ops.py`: the same math, and the reference the kernels' tests compare against).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import torch

from rung.platform.paths import cache_dir

log = logging.getLogger(__name__)

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
# -march=native: the kernels are built on the machine that runs them (an image build sets its own target)
CFLAGS = os.environ.get("RUNG_KERNEL_CFLAGS", "-O3 -march=native").split()
LIBRARY = "rung_kernels"


def build_dir() -> Path:
    sources = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(sources + torch.__version__.encode() + " ".join(CFLAGS).encode())
    return cache_dir("kernels", key.hexdigest()[:16])


def build(verbose: bool = False) -> Path:
    """Compiles the kernels (tens of seconds) and returns the shared library's path."""
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    load(name=LIBRARY, sources=[str(s) for s in SOURCES], build_directory=str(folder), extra_cflags=CFLAGS,
         is_python_module=False, verbose=verbose)
    return folder / f"{LIBRARY}.so"


@cache
def loaded() -> bool:
    """Whether torch.ops.rung.* are there to call: loads a matching build if one exists."""
    if os.environ.get("RUNG_KERNELS", "1") == "0":
        return False
    library = build_dir() / f"{LIBRARY}.so"
    if not library.is_file():
        log.warning("rung's CPU kernels are not built (`make install` or `python -m "
                    "rung.serving.worker.ops.cpu_kernels` builds them): the engine runs the slower PyTorch ops")
        return False
    torch.ops.load_library(str(library))
    return True


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                     lengths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """q [requests, heads, head_dim] scaled; keys [kv_heads, head_dim, slots] and values [kv_heads, slots,
    head_dim] views of the pool; request r's context is the runs offsets[r]..offsets[r+1]-1 (slots starts[k] ..
    starts[k] + lengths[k] - 1, in context order). Returns [requests, heads, head_dim]."""
    return torch.ops.rung.decode_attention(q, keys, values, starts, lengths, offsets)


def prefill_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, firsts: torch.Tensor,
                      counts: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor,
                      out: torch.Tensor) -> None:
    """Causal attention of spans of several rows: q [tokens, heads, head_dim] scaled, the pool views as for
    `decode_attention`; span s is rows firsts[s]..firsts[s]+counts[s]-1, the newest positions of its context (runs
    offsets[s]..offsets[s+1]-1). Writes those rows of out [tokens, heads, head_dim]."""
    torch.ops.rung.prefill_attention(q, keys, values, firsts, counts, starts, lengths, offsets, out)


def write_kv(k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v [tokens, kv_heads, head_dim] into the pool views keys [kv_heads, head_dim, slots] and values [kv_heads,
    slots, head_dim], token t at slots[t]."""
    torch.ops.rung.write_kv(k, v, keys, values, slots)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x [tokens, heads, head_dim] in place by fp32 tables cos, sin [tokens, (1,) head_dim]; returns x."""
    torch.ops.rung.rotary_(x, cos, sin)
    return x


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.ops.rung.rms_norm(x, weight, eps)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [tokens, 2f] = [gate | up]."""
    return torch.ops.rung.silu_and_mul(gate_up)


def quantized_linear(x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, shifts: torch.Tensor,
                     out_features: int) -> torch.Tensor:
    """x [rows, in] (float) times a weight of int8 levels, in the layouts `cpu_ops.pack_quantized` makes: each row
    of x quantized to int8 with its own scale, integer products, fp32 scales per output row and group. Returns
    [rows, out_features] in float."""
    return torch.ops.rung.quantized_linear(x, levels, scales, shifts, out_features)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build rung's CPU kernels.")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    print(f"built {build(args.verbose)}")


if __name__ == "__main__":
    main()
