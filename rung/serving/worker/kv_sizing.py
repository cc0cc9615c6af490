"""How many KV-cache blocks the engine allocates. A configured `kv_cache_memory` is taken as given; otherwise a CPU
gets CPU_KV_CACHE_MEMORY, and a GPU gets vLLM's rule: the engine may hold `gpu_memory_utilization` of the device's
memory, and the KV cache is what remains of that after the weights, the activation peak of a forward at the largest
batch the scheduler can form (measured, not estimated), and what other processes and the CUDA context hold.

The arithmetic is plain functions of byte counts, so it is tested without a GPU; only `kv_cache_bytes` reads a
device.
"""

from __future__ import annotations

import math

import torch

from rung.errors import ConfigError
from rung.serving.config import CPU_KV_CACHE_MEMORY, EngineConfig
from rung.serving.worker.model import InferenceModel
from rung.serving.worker.model_spec import ModelSpec
from rung.serving.worker.step import StepInputs
from rung.serving.worker.weights import expected_shapes

GIB = 1 << 30


def num_kv_blocks(spec: ModelSpec, block_size: int, dtype: torch.dtype, memory: int) -> int:
    """How many blocks of `block_size` tokens of every layer's keys and values fit in `memory` bytes (at least 1)."""
    block_bytes = spec.num_layers * 2 * block_size * spec.num_kv_heads * spec.head_dim * dtype.itemsize
    return max(memory // block_bytes, 1)


def weight_bytes(spec: ModelSpec, dtype: torch.dtype) -> int:
    """The weights' size on the device, from config.json alone (before anything is read or allocated)."""
    return sum(math.prod(shape) for shape in expected_shapes(spec).values()) * dtype.itemsize


def check_weights_fit(weights: int, total: int, utilization: float) -> None:
    """Refuse a model whose weights alone exceed the engine's share of the device."""
    if weights > utilization * total:
        raise ConfigError("gpu_memory_utilization", f"{utilization:g} of the GPU's {total / GIB:.1f} GiB is "
                          f"{utilization * total / GIB:.1f} GiB, and the model's weights alone take "
                          f"{weights / GIB:.1f} GiB: the model does not fit this device (a smaller dtype, a larger "
                          "share, or a larger device)")


def gpu_kv_budget(total: int, used_elsewhere: int, weights: int, peak_activations: int, utilization: float) -> int:
    """Bytes for the KV cache: the engine's share of the device less what the weights, the profiled activation peak
    and other holders (processes, the CUDA context) take; refused when nothing is left."""
    budget = int(utilization * total) - used_elsewhere - weights - peak_activations
    if budget <= 0:
        raise ConfigError("gpu_memory_utilization", f"{utilization:g} of the GPU's {total / GIB:.1f} GiB leaves no "
                          f"room for the KV cache: weights {weights / GIB:.2f} GiB, activations at the largest batch "
                          f"{peak_activations / GIB:.2f} GiB, held elsewhere {used_elsewhere / GIB:.2f} GiB (raise "
                          "it, or lower --max-num-batched-tokens)")
    return budget


def profile_forward(model: InferenceModel, max_num_batched_tokens: int, max_num_seqs: int) -> torch.Tensor:
    """One forward at the largest step the scheduler can form — max_num_batched_tokens tokens in up to max_num_seqs
    spans — and its logits, over a scratch cache just large enough, so that the allocator's peak shows what a step
    needs. Returns the logits."""
    spec, device = model.spec, model.device
    spans = min(max_num_seqs, max_num_batched_tokens)
    rows = max_num_batched_tokens // spans
    tokens = rows * spans
    dtype = model.w["model.norm.weight"].dtype
    cache = torch.zeros(spec.num_layers, 2, spec.num_kv_heads, rows * spec.head_dim, dtype=dtype, device=device)
    step = StepInputs(token_ids=torch.zeros(tokens, dtype=torch.long, device=device),
                      positions=torch.arange(rows, device=device).repeat(spans),
                      slots=torch.arange(rows, device=device).repeat(spans),
                      spans=[(span * rows, rows, [slice(0, rows)]) for span in range(spans)])
    model.ops.prepare(step)
    hidden = model.forward(step, cache)
    return model.logits(hidden[rows - 1::rows])


def kv_cache_bytes(model: InferenceModel, config: EngineConfig) -> int:
    """The KV pool's size for this model on its device under the config (see the module's docstring)."""
    if config.kv_cache_memory is not None:
        return config.kv_cache_memory
    device = model.device
    if device.type != "cuda":
        return CPU_KV_CACHE_MEMORY
    torch.cuda.synchronize(device)
    weights = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    profile_forward(model, config.max_num_batched_tokens, config.max_num_seqs)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - weights
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used_elsewhere = total - free - torch.cuda.memory_reserved(device)
    return gpu_kv_budget(total, used_elsewhere, weights, peak, config.gpu_memory_utilization)


def check_device_fits(spec: ModelSpec, dtype: torch.dtype, device: torch.device, utilization: float) -> None:
    """Before the weights load: refuse a model that cannot fit the GPU it is meant for."""
    if device.type == "cuda":
        check_weights_fit(weight_bytes(spec, dtype), torch.cuda.get_device_properties(device).total_memory,
                          utilization)
