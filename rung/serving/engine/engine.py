"""The engine: one `step()` is schedule → run the model → record the sampled tokens, and returns what each
request gained. The offline `LLM` loops over it; the `AsyncEngine` runs it on a thread or in a process of its
own (`engine/core.py`).

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
from pathlib import Path

from rung.serving.config import EngineConfig
from rung.serving.core.kv_cache import KVCacheManager
from rung.serving.core.outputs import Sample
from rung.serving.core.params import SamplingParams
from rung.serving.core.request import Request, Status
from rung.serving.core.scheduler import Scheduler, StepPlan
from rung.serving.core.validation import validate_request
from rung.serving.engine.messages import EngineLimits, EngineStats, TokenEvent
from rung.serving.worker.parallel.launch import LocalLauncher
from rung.serving.worker.parallel.workers import Workers
from rung.serving.worker.runner import ModelRunner, PreparedStep, resolve_device
from rung.serving.worker.tuning import default_nano_batches, tuned_nano_batches


def start_workers(model_dir: str | Path, config: EngineConfig) -> Workers | None:
    """Under tensor parallelism, ranks 1..N-1, started as `distributed_backend` says (Ray's launcher imported only
    when asked for); None on one device."""
    if config.tensor_parallel_size == 1:
        return None
    if config.distributed_backend == "ray":
        from rung.serving.worker.parallel.ray_ranks import RayLauncher

        return Workers(model_dir, config, RayLauncher)
    return Workers(model_dir, config, LocalLauncher)


class Engine:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None):
        self.config = config = config or EngineConfig()
        device = resolve_device(config.device)
        self.nano_batches = (config.nano_batches or tuned_nano_batches(model_dir, device)
                             or default_nano_batches(device))
        self.runner = ModelRunner.for_folder(model_dir, config, self.nano_batches, start_workers(model_dir, config))
        self.model, self.spec = self.runner.model, self.runner.model.spec
        self.kv = KVCacheManager(self.runner.num_blocks, self.runner.block_size,
                                 enable_prefix_caching=config.enable_prefix_caching and not config.deterministic)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   deterministic=config.deterministic)
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
        if params.structured is not None:
            self.runner.prepare_grammar(params.structured)
        self.scheduler.add(Request(request_id, list(prompt_token_ids), params, priority=priority,
                                   eos_token_ids=frozenset(self.spec.eos_token_ids)))

    def abort(self, request_id: str, status: Status = Status.FINISHED_ABORTED) -> None:
        """Finish a request now and free its blocks (also how a matched stop string ends one)."""
        if self.scheduler.abort(request_id, status):
            if self._in_flight is None:
                self.runner.release(request_id)
            else:
                self._release_after_step.append(request_id)

    def check_health(self) -> None:
        """Raise RungError if the engine can no longer compute a step (a tensor-parallel worker has exited)."""
        if self.runner.workers is not None:
            self.runner.workers.check()

    def close(self) -> None:
        """Stop what the engine started: the compute thread, and the other tensor-parallel ranks."""
        if self._compute is not None:
            self._compute.shutdown(wait=True)
        self.runner.close()

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

    @property
    def limits(self) -> EngineLimits:
        workers = self.runner.workers
        return EngineLimits(self.max_model_len, self.spec.vocab_size, (self.kv.num_blocks, self.kv.block_size),
                            self.async_scheduling, self.kv.enable_prefix_caching,
                            workers.weight_bytes if workers else ())

    def stats(self) -> EngineStats:
        return EngineStats(running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                           kv_usage=self.kv.usage, prefix_queries=self.kv.prefix_queries,
                           prefix_hits=self.kv.prefix_hits, preemptions=self.scheduler.num_preemptions)
