"""rung's compiled CPU kernel: attention for every decoding request of a step in one call.

A decode's attention in PyTorch is three small operators per layer per request, and on a CPU each costs ~15 µs
of dispatch — half of a 64-request decode step. `csrc/decode_attention.cpp` does them all in one call.

`make install` builds it (`python -m rung.serving.kernels`) with torch's extension builder into a folder keyed
by the source's hash, torch's version and the compiler flags, so a stale or foreign build is never loaded; the
engine only loads what is there and never compiles at serve time. Without a build, or with RUNG_DECODE_KERNEL=0,
the engine runs the PyTorch path (the same math, and the reference the kernel's tests compare against).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "decode_attention.cpp"
# -march=native: the kernel is built on the machine that runs it (an image build sets its own target)
CFLAGS = os.environ.get("RUNG_KERNEL_CFLAGS", "-O3 -march=native").split()
LIBRARY = "rung_kernels"


def build_dir() -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + " ".join(CFLAGS).encode())
    return Path(__file__).parent / "_build" / key.hexdigest()[:16]


def build(verbose: bool = False) -> Path:
    """Compiles the kernel (about a minute) and returns the shared library's path."""
    from torch.utils.cpp_extension import load

    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    load(name=LIBRARY, sources=[str(SOURCE)], build_directory=str(folder), extra_cflags=CFLAGS,
         is_python_module=False, verbose=verbose)
    return folder / f"{LIBRARY}.so"


@cache
def decode_kernel_loaded() -> bool:
    """Whether torch.ops.rung.decode_attention is there to call: loads a matching build if one exists."""
    if os.environ.get("RUNG_DECODE_KERNEL", "1") == "0":
        return False
    library = build_dir() / f"{LIBRARY}.so"
    if not library.is_file():
        log.warning("rung's decode-attention kernel is not built (`make install` or `python -m "
                    "rung.serving.kernels` builds it): decodes run the slower PyTorch path")
        return False
    torch.ops.load_library(str(library))
    return True


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: torch.Tensor,
                     lengths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """q [requests, heads, head_dim] scaled; keys [kv_heads, head_dim, slots] and values [kv_heads, slots,
    head_dim] views of the pool; request r's context is the runs offsets[r]..offsets[r+1]-1 (slots starts[k] ..
    starts[k] + lengths[k] - 1, in context order). Returns [requests, heads, head_dim]."""
    return torch.ops.rung.decode_attention(q, keys, values, starts, lengths, offsets)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build rung's CPU decode-attention kernel.")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    print(f"built {build(args.verbose)}")


if __name__ == "__main__":
    main()
