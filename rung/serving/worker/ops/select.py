"""Which compute path a model on a given device runs (`ops/__init__.py` lists them)."""

from __future__ import annotations

import importlib.util

import torch

from rung.errors import ConfigError
from rung.serving.worker.ops import Ops, cpu_kernels
from rung.serving.worker.ops.cpu_ops import CpuKernelOps
from rung.serving.worker.ops.torch_ops import TorchOps


def select_ops(device: torch.device, backend: str = "auto") -> Ops:
    """`auto`: rung's C++ kernels on a CPU where they are built (and RUNG_KERNELS is not 0), Triton on a GPU where
    it is installed, PyTorch's operators elsewhere. `cpu`, `torch` and `triton` choose, and are refused where they
    cannot run."""
    if backend == "auto":
        if device.type == "cpu":
            return CpuKernelOps() if cpu_kernels.loaded() else TorchOps()
        if importlib.util.find_spec("triton") is None:
            return TorchOps()
        backend = "triton"
    if backend == "cpu":
        if device.type != "cpu" or not cpu_kernels.loaded():
            raise ConfigError("attention_backend", "cpu (rung's C++ kernels) needs --device cpu and the kernels "
                              "built (make install builds them; RUNG_KERNELS=0 turns them off)")
        return CpuKernelOps()
    if backend == "triton":
        from rung.serving.worker.ops.triton_ops import TritonOps, triton_available

        triton_available(device)
        return TritonOps()
    return TorchOps()
