"""The engine: one `step()` is schedule → run the model → record the sampled tokens, and returns what each
request gained. The offline `LLM` loops over it; the `AsyncEngine` runs it on a thread or in a process of its
own (engine_core.py).

Async scheduling keeps the model busy between steps: the model runs on a compute thread, and while step i computes,
step i+1 is scheduled and its inputs are built, its requests continuing from the tokens step i has yet to sample
(filled in when they arrive); step i's outputs are returned while step i+1 computes. It is on by default on a GPU,
as in vLLM: there the scheduler's Python runs while the GPU computes. On a CPU both threads need the one GIL
between operators and the scheduling is ~3% of a step, so it measured no gain there (bench/RESULTS.md) and is off.

    sync:   schedule i │ compute i │ record i │ schedule i+1 │ compute i+1 │ ...
    async:  compute:         │ compute i          │ compute i+1        │
            engine:  schedule i+1, prepare │ wait │ record i, launch i+1 │ events i │ schedule i+2 ...

A request that stops at step i (a stop token) was already planned into step i+1: it is dropped from that plan
before it launches, so no token past a stop is ever computed into another request's blocks.

Requests are validated here, before anything is scheduled, so a bad one is refused with an error naming the field
while the others keep running.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from rung.errors import ConfigError
from rung.serving.kv_cache import KVCacheManager
from rung.serving.model import InferenceModel, load_weights
from rung.serving.model_spec import load_spec
from rung.serving.params import SamplingError, SamplingParams
from rung.serving.request import Request, Status
from rung.serving.runner import ModelRunner, PreparedStep
from rung.serving.sampling import Sample
from rung.serving.scheduler import Scheduler, StepPlan
from rung.serving.tuning import default_nano_batches, tuned_nano_batches

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
    async_scheduling: bool | None = None  # plan step i+1 while step i computes; None: on a GPU only
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
        # async scheduling: the step computing on the compute thread, and requests aborted meanwhile whose
        # sampler state is freed once it returns (the compute thread may still be sampling for them)
        overlapped = config.async_scheduling if config.async_scheduling is not None else device.type == "cuda"
        self._compute = ThreadPoolExecutor(1, thread_name_prefix="rung-compute") if overlapped else None
        self._in_flight: tuple[StepPlan, Future] | None = None
        self._release_after_step: list[str] = []
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
            if self._in_flight is None:
                self.runner.release(request_id)
            else:
                self._release_after_step.append(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._in_flight is not None

    @property
    def async_scheduling(self) -> bool:
        return self._compute is not None

    def step(self) -> list[TokenEvent]:
        """What requests gained in one step: under async scheduling, the step that was computing when this was
        called (the next one is launched before this returns)."""
        plan = self.scheduler.schedule()
        if self._compute is None:
            samples = self.runner.run(plan)
            return self._events(plan, samples, self._update(plan, samples))
        prepared = self.runner.prepare(plan) if plan.spans else None
        if self._in_flight is None:
            self._launch(plan, prepared)
            return []
        computed, future = self._in_flight
        samples = future.result()
        finished = self._update(computed, samples)
        if any(span.request_id not in self.scheduler.requests for span in plan.spans):  # stopped by that step
            plan.spans = [span for span in plan.spans if span.request_id in self.scheduler.requests]
            prepared = self.runner.prepare(plan) if plan.spans else None
        if prepared is not None:
            self.runner.fill(prepared, samples)
        self._launch(plan, prepared)
        for request_id in self._release_after_step:  # aborted while that step computed: its sampler is done
            self.runner.release(request_id)
        self._release_after_step.clear()
        return self._events(computed, samples, finished)

    def _launch(self, plan: StepPlan, prepared: PreparedStep | None) -> None:
        self._in_flight = None if prepared is None else (plan, self._compute.submit(self.runner.execute, prepared))

    def _update(self, plan: StepPlan, samples: dict[str, Sample]) -> dict[str, Request]:
        """Give the scheduler a computed step's tokens; the requests that finished, by id."""
        sampled = {request_id: sample.token_id for request_id, sample in samples.items()}
        return {r.request_id: r for r in self.scheduler.update(plan, sampled)}

    def _events(self, plan: StepPlan, samples: dict[str, Sample], finished: dict[str, Request]) -> list[TokenEvent]:
        """What each request gained in a computed step; a finished request's sampler state is freed."""
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
