"""Process-level settings that must be right before torch, DeepSpeed or Ray do any work.

On a CPU box: one torch thread per process (two threads on two cores made timings erratic and 5-50x slower),
DeepSpeed's CPU accelerator with gloo, and every listener on loopback. On GPU clusters the same calls choose CUDA,
NCCL and the cluster's defaults, so jobs change by configuration only.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
import uuid

import torch

from rung.platform.gpus import gpu_from_device_name


def configure_process(threads: int | None = None) -> None:
    """Thread count and accelerator choice for this process; call before importing deepspeed."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(threads or int(os.environ["OMP_NUM_THREADS"]))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def single_machine() -> bool:
    """True unless rung was pointed at a cluster: then listeners must stay on loopback."""
    return os.environ.get("RUNG_CLUSTER", "") != "1"


def listen_host() -> str:
    return "127.0.0.1" if single_machine() else "0.0.0.0"


def file_rendezvous(directory: str | None = None) -> str:
    """A fresh file:// rendezvous: no TCP listener, and never a stale file from an earlier group."""
    path = os.path.join(directory or tempfile.gettempdir(), f"rung-rendezvous-{uuid.uuid4().hex}")
    return f"file://{path}"


def tcp_rendezvous() -> str:
    """tcp://IP:PORT on this node, for groups that span machines (rank 0 calls it and shares the result)."""
    host = socket.gethostbyname(socket.gethostname())
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    return f"tcp://{host}:{port}"


def init_process_group(rank: int, world_size: int, local_rank: int, init_method: str) -> None:
    """The torch/DeepSpeed process group: gloo on CPU (over loopback on one machine), NCCL on GPUs."""
    import deepspeed

    _skip_deepspeed_shm_build()
    if torch.distributed.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    elif single_machine():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # DeepSpeed's engine reads these even when the process group already exists.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, init_method=init_method, rank=rank, world_size=world_size)


def peak_flops(dtype: str) -> float:
    """Per-device peak FLOP/s for MFU: the datasheet for known GPUs; elsewhere (a CPU, a GPU rung has no datasheet
    for) a measured matmul rate on that device, in the training dtype."""
    gpu = gpu_from_device_name(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    if gpu is not None:
        return gpu.peak_flops(dtype)
    if torch.cuda.is_available():
        return _measured_matmul_flops("cuda", torch.bfloat16 if dtype == "bfloat16" else torch.float32, size=4096)
    return _measured_matmul_flops("cpu", torch.float32)


def _measured_matmul_flops(device: str, dtype: torch.dtype, size: int = 512, seconds: float = 0.2) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - started)


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed JIT-compiles a shared-memory op (2-3 minutes) on every CPU init, used only for inference
    all-reduce; training never needs it. `import deepspeed.comm.torch as m` would bind the torch package (a name
    clash), so the module is fetched from sys.modules."""
    import deepspeed.comm  # noqa: F401  (loads deepspeed.comm.torch)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
