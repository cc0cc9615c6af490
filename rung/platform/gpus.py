"""The accelerators rung plans for and measures MFU against: memory and dense bf16 tensor-core peak (TF32 and fp32
training count half of it), from the vendors' datasheets. One table, read by MFU (`runtime.peak_flops`) and by the
planner (`rung plan --gpu`)."""

from __future__ import annotations

from dataclasses import dataclass

from rung.errors import ConfigError

GiB = 1 << 30
# What a plan may use of a card: the rest holds the CUDA context, NCCL's buffers and allocator fragmentation.
USABLE_FRACTION = 0.92
# The MFU a plan assumes unless told: torchtitan's Llama-3-8B on H100 in bf16 reaches about this.
PLANNING_MFU = 0.40


@dataclass(frozen=True, slots=True)
class GPU:
    name: str  # as `rung plan --gpu` takes it
    marker: str  # how torch.cuda.get_device_name() spells it
    memory_bytes: int
    bf16_flops: float  # dense, no sparsity

    def peak_flops(self, dtype: str) -> float:
        return self.bf16_flops if dtype == "bfloat16" else self.bf16_flops / 2


GPUS: dict[str, GPU] = {gpu.name: gpu for gpu in (
    GPU("h200", "H200", 141 * 10**9, 989e12),
    GPU("h100", "H100", 80 * GiB, 989e12),
    GPU("a100", "A100", 80 * GiB, 312e12),
    GPU("a100-40gb", "A100", 40 * GiB, 312e12),
    GPU("l40s", "L40S", 48 * GiB, 362e12),
    GPU("a10", "A10", 24 * GiB, 125e12),
)}


def gpu_named(name: str) -> GPU:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ConfigError("--gpu", f"unknown GPU {name!r}; known: {', '.join(GPUS)}") from None


def gpu_from_device_name(device_name: str) -> GPU | None:
    """The catalog entry of a CUDA device name (e.g. 'NVIDIA H100 80GB HBM3'), or None for an unknown card. The
    first match wins, so 'A100' is tried before 'A10'."""
    return next((gpu for gpu in GPUS.values() if gpu.marker in device_name), None)
