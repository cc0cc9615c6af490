"""Process-level settings that must be right before torch, DeepSpeed or Ray do any work.

On a CPU box: one torch thread per process (two threads on two cores made timings erratic and 5-50x slower),
DeepSpeed's CPU accelerator with gloo, and every listener on loopback. On GPU clusters the same calls choose CUDA,
NCCL and the cluster's defaults, so jobs change by configuration only.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

import torch


def configure_process(threads: int | None = None) -> None:
    """Thread count and accelerator choice for this process; call before importing deepspeed."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(threads or int(os.environ["OMP_NUM_THREADS"]))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def init_single_process() -> None:
    """A one-process group for DeepSpeed, rendezvousing through a fresh file (no TCP listener at all)."""
    import deepspeed

    _skip_deepspeed_shm_build()
    if torch.distributed.is_initialized():
        return
    rendezvous = os.path.join(tempfile.gettempdir(), f"rung-rendezvous-{uuid.uuid4().hex}")
    # DeepSpeed's engine reads these even when the process group already exists.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, init_method=f"file://{rendezvous}", rank=0, world_size=1)


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory op (2-3 minutes) on every CPU init, used only for inference
    all-reduce; training never needs it. `import deepspeed.comm.torch as m` would bind the torch package (a name
    clash), so the module is fetched from sys.modules."""
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    module = sys.modules["deepspeed.comm.torch"]
    module.build_shm_op = lambda: None
