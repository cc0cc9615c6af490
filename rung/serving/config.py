"""The serving config schema: every setting of `rung serve`, the offline `LLM` and a Ray Serve application, with its
default, in one place. The CLI reads its defaults from these dataclasses, and every way in — flags, a Ray Serve
config's `args`, `LLM(**settings)` — goes through `rung.config.from_dict`, so a bad value is refused with an error
naming its field, before anything loads. Torch-free: `rung --help` and the API layer import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rung.config import from_dict
from rung.errors import ConfigError

DType = Literal["float32", "bfloat16", "float16"]
Backend = Literal["rung", "vllm"]
AttentionBackend = Literal["auto", "cpu", "torch", "triton"]
Quantization = Literal["none", "int8", "int4"]
DistributedBackend = Literal["mp", "ray"]
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block when the config leaves it to rung's engine
CPU_KV_CACHE_MEMORY = 256 << 20  # bytes of KV pool on a CPU when the config does not say
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+)$")


@dataclass(kw_only=True, slots=True, frozen=True)
class EngineConfig:
    """How the engine computes; the same fields configure rung's engine and, where vLLM has them, vLLM's."""

    dtype: DType = "float32"  # weights and KV cache
    block_size: int | None = None  # tokens per KV block; None: 16 for rung's engine, vLLM's own choice for vLLM's
    num_blocks: int | None = None  # None: as many as kv_cache_memory holds
    # bytes for the preallocated KV pool; None: CPU_KV_CACHE_MEMORY on a CPU, and on a GPU what
    # gpu_memory_utilization of its memory leaves after the weights and a profiled forward (worker/kv_sizing.py)
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9  # the share of the GPU's memory the engine may take, as vLLM's
    enforce_eager: bool = False  # no CUDA graphs: every decode step launches its kernels one by one
    max_num_seqs: int = 64  # requests running at once
    max_num_batched_tokens: int = 2048  # per step: decodes first, then chunked prefill
    max_model_len: int | None = None  # None: the model's context window
    nano_batches: int | None = None  # per step; None: a tuned value for this device and model, else the default
    deterministic: bool = False  # batch-invariant outputs (no prefix cache, request-only chunking, per-row GEMMs)
    enable_prefix_caching: bool = True  # reuse the KV of full blocks of earlier prompts (off when deterministic)
    async_scheduling: bool | None = None  # plan step i+1 while step i computes; None: on a GPU only
    device: str | None = None  # where the model and KV cache live; None: the GPU when there is one, else the CPU
    # attention (and the other per-layer operations): auto = rung's C++ kernels on a CPU, Triton on a GPU where it is
    # installed, else PyTorch's operators; cpu / torch / triton to choose (worker/ops/select.py)
    attention_backend: AttentionBackend = "auto"
    # the attention, MLP and MoE experts' projections' weights as integers (worker/quantization.py): int8 with a
    # scale per output row, int4 with one per quantization_group_size input features; embeddings, norms, routers and
    # (unless quantize_lm_head) the readout stay in dtype
    quantization: Quantization = "none"
    quantization_group_size: int = 128  # int4's input features per scale: must divide every projection's input size
    quantize_lm_head: bool = False
    # processes the model is split across, one per GPU (or CPU cores, with gloo): Megatron-style sharding of heads,
    # FFN width and vocabulary (worker/parallel/); rank 0 is the engine core
    tensor_parallel_size: int = 1
    # how ranks 1..N-1 start: mp = processes on this machine; ray = Ray actors in a placement group (across nodes)
    distributed_backend: DistributedBackend = "mp"
    overlap_collectives: bool = True  # a nano-batch's all-reduce runs while the next one computes (NanoFlow)

    def __post_init__(self) -> None:
        for name in ("block_size", "num_blocks", "kv_cache_memory", "max_num_seqs", "max_num_batched_tokens",
                     "max_model_len", "nano_batches", "quantization_group_size", "tensor_parallel_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be at least 1, got {value}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.device is not None and not _DEVICE.match(self.device):
            raise ConfigError("device", f"must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.tensor_parallel_size > 1 and self.deterministic:
            raise ConfigError("tensor_parallel_size", "deterministic mode is not supported with tensor parallelism "
                              "(its per-request GEMMs would each need their own collectives)")


RUNG_ONLY = ("nano_batches", "deterministic", "device", "quantize_lm_head")  # settings vLLM has no counterpart for


@dataclass(kw_only=True, slots=True, frozen=True)
class ServeConfig:
    """The server around the engine: what it serves, who may call it, how much it queues, how it stops."""

    model_dir: str
    served_model_name: str | None = None  # the model id clients use; None: the folder's name
    api_key: str | None = None  # require 'Authorization: Bearer KEY' on the API routes
    max_queued_requests: int = 256  # waiting (admitted, not yet running) requests before 429
    max_queued_tokens: int | None = None  # prompt tokens of requests not yet producing, before 429; None = no bound
    max_body_bytes: int = 4 << 20
    grace_seconds: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    backend: Backend = "rung"  # which engine computes: rung's own, or vLLM's (an optional extra)
    # how the model writes tool calls (api/tool_calls.py); None: the format its chat template shows, if rung knows it
    tool_call_parser: str | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        for name in ("max_queued_requests", "max_queued_tokens", "max_body_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be at least 1, got {value}")
        if self.grace_seconds < 0:
            raise ConfigError("grace_seconds", f"must be >= 0, got {self.grace_seconds}")
        for name in RUNG_ONLY if self.backend == "vllm" else ():
            if getattr(self.engine, name):
                raise ConfigError(f"engine.{name}", "applies to rung's engine only; leave it unset with the vllm "
                                  "engine")
        for name, unset in (("attention_backend", "auto"), ("quantization", "none"), ("overlap_collectives", True),
                            ("distributed_backend", "mp")):
            if self.backend == "vllm" and getattr(self.engine, name) != unset:
                raise ConfigError(f"engine.{name}", "applies to rung's engine only; leave it unset with the vllm "
                                  "engine")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).resolve().name


ENGINE_FIELDS = frozenset(EngineConfig.__dataclass_fields__)
SERVE_FIELDS = frozenset(ServeConfig.__dataclass_fields__) - {"engine"}


def serve_config(settings: dict[str, Any]) -> ServeConfig:
    """A ServeConfig from one flat mapping of serve and engine fields (the CLI's, and a Ray Serve config's `args`);
    unknown keys and bad values are ConfigErrors naming the field (engine fields as `engine.NAME`)."""
    unknown = sorted(set(settings) - SERVE_FIELDS - ENGINE_FIELDS)
    if unknown:
        known = ", ".join(sorted(SERVE_FIELDS | ENGINE_FIELDS))
        raise ConfigError(unknown[0], f"unknown serve setting (known: {known})")
    nested = {k: v for k, v in settings.items() if k in SERVE_FIELDS}
    nested["engine"] = {k: v for k, v in settings.items() if k in ENGINE_FIELDS}
    return from_dict(ServeConfig, nested)


def engine_config(settings: dict[str, Any]) -> EngineConfig:
    """An EngineConfig from keyword settings (the offline `LLM`'s), checked like every other config."""
    return from_dict(EngineConfig, settings)
