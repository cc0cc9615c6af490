"""Which compute path a model on a given device runs (`ops/__init__.py` lists them)."""

from __future__ import annotations

import torch

from rung.serving.worker.ops import Ops, cpu_kernels
from rung.serving.worker.ops.cpu_ops import CpuKernelOps
from rung.serving.worker.ops.torch_ops import TorchOps


def select_ops(device: torch.device) -> Ops:
    """rung's C++ kernels on a CPU where they are built (and RUNG_KERNELS is not 0), PyTorch's operators elsewhere."""
    return CpuKernelOps() if device.type == "cpu" and cpu_kernels.loaded() else TorchOps()
