"""The engine: one `step()` is schedule → run the model → record the sampled tokens, and returns what each
request gained. The offline `LLM` loops over it; the `AsyncEngine` runs it on a thread or in a process of its
own (engine_core.py).

Requests are validated here, before anything is scheduled, so a bad one is refused with an error naming the field
while the others keep running.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rung.errors import ConfigError
from rung.serving.kv_cache import KVCacheManager
from rung.serving.model import InferenceModel, load_weights
from rung.serving.model_spec import load_spec
from rung.serving.params import SamplingError, SamplingParams
from rung.serving.request import Request, Status
from rung.serving.runner import ModelRunner
from rung.serving.sampling import Sample
from rung.serving.tuning import default_nano_batches, tuned_nano_batches
from rung.serving.scheduler import Scheduler

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    dtype: str = "float32"
    block_size: int | None = None  # tokens per KV block; None: 16 for rung's engine, vLLM's own choice for vLLM's
    num_blocks: int | None = None  # None: as many as kv_cache_memory holds
    kv_cache_memory: int = 256 << 20  # bytes for the preallocated KV pool
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048  # per step: decodes first, then chunked prefill
    max_model_len: int | None = None  # None: the model's context window
    nano_batches: int | None = None  # per step; None: a tuned value for this device and model, else the default
    deterministic: bool = False  # batch-invariant outputs (no prefix cache, request-only chunking, per-row GEMMs)
    device: str | None = None  # where the model and KV cache live; None: the GPU when there is one, else the CPU

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device is not None:
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise ConfigError("device", f"is not a torch device: {self.device!r}") from None
            if device.type == "cuda" and not torch.cuda.is_available():
                raise ConfigError("device", "is cuda, but torch sees no CUDA GPU here")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "nano_batches"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")


def validate_request(prompt_token_ids: list[int], params: SamplingParams, window: int, vocab_size: int,
                     kv_blocks: tuple[int, int] | None = None) -> None:
    """Refuse, naming the field (SamplingError), a request that can never run: an empty prompt, one that does not
    fit the context window with its max_tokens, token ids outside the vocabulary, or (given `kv_blocks`, the pool's
    block count and size) one longer than the whole KV cache. One rule set for both serving engines."""
    if not prompt_token_ids:
        raise SamplingError("prompt", "is empty")
    if len(prompt_token_ids) >= window:
        raise SamplingError("prompt", f"has {len(prompt_token_ids)} tokens; the context window is {window}")
    if len(prompt_token_ids) + params.max_tokens > window:
        raise SamplingError("max_tokens", f"{params.max_tokens} plus the prompt's {len(prompt_token_ids)} tokens "
                            f"exceeds the context window of {window}")
    if kv_blocks and len(prompt_token_ids) + params.max_tokens > kv_blocks[0] * kv_blocks[1]:
        raise SamplingError("max_tokens", f"{params.max_tokens} plus the prompt's {len(prompt_token_ids)} tokens "
                            f"exceeds the whole KV cache ({kv_blocks[0]} blocks of {kv_blocks[1]})")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise SamplingError("prompt", f"token ids must be in [0, {vocab_size})")


@dataclass
class TokenEvent:
    """What one request gained in a step: a sampled token, and whether that finished it."""

    request_id: str
    token_id: int
    sample: Sample
    finish_reason: str | None  # "stop", "length", "abort" once finished
    num_prompt_tokens: int
    num_output_tokens: int


@dataclass
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        self.spec = load_spec(model_dir)
        dtype = DTYPES[config.dtype]
        self.model = InferenceModel(self.spec, load_weights(model_dir), dtype, config.torch_device)
        block_size = config.block_size or 16
        block_bytes = (self.spec.num_layers * 2 * block_size * self.spec.num_kv_heads * self.spec.head_dim
                       * dtype.itemsize)
        num_blocks = config.num_blocks or max(config.kv_cache_memory // block_bytes, 1)
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=not config.deterministic)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   deterministic=config.deterministic)
        device = config.torch_device
        self.nano_batches = (config.nano_batches or tuned_nano_batches(model_dir, device)
                             or default_nano_batches(device))
        self.runner = ModelRunner(self.model, num_blocks, block_size, dtype, self.nano_batches,
                                  config.deterministic)
        self.last_step_tokens = 0  # tokens computed by the latest step
        self.max_model_len = min(config.max_model_len or self.spec.max_position_embeddings,
                                 self.spec.max_position_embeddings)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run, naming the field: SamplingError."""
        validate_request(prompt_token_ids, params, self.max_model_len, self.spec.vocab_size,
                         (self.kv.num_blocks, self.kv.block_size))

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        self.validate(prompt_token_ids, params)
        self.scheduler.add(Request(request_id, list(prompt_token_ids), params, priority=priority,
                                   eos_token_ids=frozenset(self.spec.eos_token_ids)))

    def abort(self, request_id: str, status: Status = Status.FINISHED_ABORTED) -> None:
        """Finish a request now and free its blocks (also how a matched stop string ends one)."""
        if self.scheduler.abort(request_id, status):
            self.runner.release(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def step(self) -> list[TokenEvent]:
        plan = self.scheduler.schedule()
        samples = self.runner.run(plan)
        finished = {r.request_id: r for r in self.scheduler.update(plan, {k: v.token_id for k, v in samples.items()})}
        events = []
        for request_id, sample in samples.items():
            request = finished.get(request_id) or self.scheduler.requests.get(request_id)
            if request is None:
                continue
            done = request_id in finished
            if done:
                self.runner.release(request_id)
            events.append(TokenEvent(request_id, sample.token_id, sample, request.status.value if done else None,
                                     len(request.prompt_token_ids), len(request.output_token_ids)))
        self.last_step_tokens = plan.num_tokens
        return events

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           kv_usage=self.kv.usage, prefix_queries=self.kv.prefix_queries,
                           prefix_hits=self.kv.prefix_hits, preemptions=self.scheduler.num_preemptions)
