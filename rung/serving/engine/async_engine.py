"""The engine behind the HTTP server: the model steps in an engine core (its own process under `rung serve`, a
compute thread for an Engine built by the caller; `engine/core.py`) while the asyncio thread serves HTTP, detokenizes
and streams — on a CPU one core computes while the other does everything else.

    asyncio thread:  request → validate → send ─┐        ┌─► per-request queue → detokenize/stop → stream
    engine core:                messages → step() → StepReport (tokens, stats)

Only the core touches the Engine's mutable state (scheduler, cache); the asyncio side talks to it by messages, so a
request added or aborted mid-step takes effect at the next step boundary.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass

from rung.serving.core.params import SamplingParams
from rung.serving.core.request import Status
from rung.serving.core.validation import validate_request
from rung.serving.engine.client import EngineFailure, Output
from rung.serving.engine.core import ProcessCore, ThreadCore
from rung.serving.engine.detokenizer import Decoder, TextStream
from rung.serving.engine.engine import Engine
from rung.serving.engine.messages import AbortRequest, AddRequest, StepReport, TokenEvent
from rung.serving.metrics import RequestClock, ServeMetrics

STALL_SECONDS = 60.0  # work pending and no step finished for this long: /health fails


@dataclass
class _Stream:
    text: TextStream
    queue: asyncio.Queue
    clock: RequestClock


class AsyncEngine:
    """rung's engine as an EngineClient (`engine/client.py`)."""

    def __init__(self, core: Engine | ThreadCore | ProcessCore, tokenizer: Decoder,
                 metrics: ServeMetrics | None = None):
        """`core`: where steps run; a bare Engine runs on a compute thread of this process."""
        self.core = ThreadCore(core) if isinstance(core, Engine) else core
        self.tokenizer, self.metrics = tokenizer, metrics
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._running = 0
        self._failure: str | None = None
        self._busy_window = (time.monotonic(), 0.0)  # (start, seconds of steps in it): the compute-busy gauge
        self.last_progress = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def post(callback, argument) -> None:  # from the core's thread to the asyncio thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(callback, argument)

        self.core.start(lambda report: post(self._on_report, report), lambda reason: post(self._on_failure, reason))

    def stop(self) -> None:
        self.core.stop()

    @property
    def healthy(self) -> bool:
        """The engine core is alive and, when there is work, finishing steps."""
        return self.core.alive and self._failure is None and (
            not self._streams or time.monotonic() - self.last_progress < STALL_SECONDS)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        """Requests admitted but not running yet: what the server's queue bound counts."""
        return max(len(self._streams) - self._running, 0)

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens of requests that have produced nothing yet (queued, or prefilling)."""
        return sum(s.clock.prompt_tokens for s in self._streams.values() if s.clock.last_token is None)

    @property
    def max_model_len(self) -> int:
        return self.core.limits.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.core.limits.vocab_size

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        limits = self.core.limits
        validate_request(prompt_token_ids, params, limits.max_model_len, limits.vocab_size, limits.kv_blocks)

    def describe(self) -> str:
        limits = self.core.limits
        scheduling = "async scheduling" if limits.async_scheduling else "sync scheduling"
        blocks, size = limits.kv_blocks
        caching = "prefix caching" if limits.prefix_caching else "no prefix caching"
        ranks = limits.rank_weight_bytes
        held = ", ".join(f"{b / 2**20:.1f}" for b in ranks)
        parallel = f", tensor-parallel over {len(ranks)} ranks holding {held} MiB of weights" if ranks else ""
        return f"rung engine {self.core.place}{parallel}, {scheduling}, {caching}, {blocks} KV blocks of {size} tokens"

    # -- the asyncio side ------------------------------------------------------------------------------------------
    def generate(self, prompt_token_ids: list[int], params: SamplingParams, stop: list[str] | tuple = (),
                 priority: int = 0) -> RequestHandle:
        """Queue one request now and return the async iterator of its outputs. Raises SamplingError, before
        anything is queued, if it can never run. `handle.abort()` (a client that went away) frees its blocks."""
        self.validate(prompt_token_ids, params)
        if self._failure is not None:
            raise EngineFailure(self._failure)
        request_id = f"r{next(self._ids)}"
        text = TextStream(self.tokenizer, stop, params.skip_special_tokens, params.spaces_between_special_tokens)
        stream = _Stream(text, asyncio.Queue(), RequestClock(self.metrics,
                                                                                         len(prompt_token_ids)))
        self._streams[request_id] = stream
        self._send(AddRequest(request_id, list(prompt_token_ids), params, priority))
        return RequestHandle(self, request_id, stream)

    def _output(self, request_id: str, stream: _Stream, events: list[tuple[TokenEvent, float]]) -> Output:
        text, token_ids, samples, reason, event = "", [], [], None, events[-1][0]
        for event, step_started in events:
            stream.clock.token(step_started)
            token_ids.append(event.token_id)
            samples.append(event.sample)
            text += stream.text.add(event.token_id)
            reason = event.finish_reason
            if stream.text.stopped:  # a stop string: finish now, however many tokens the engine has made since
                self._send(AbortRequest(request_id, Status.FINISHED_STOPPED))
                reason = Status.FINISHED_STOPPED.value
                break
        if reason is not None:
            text += stream.text.finish()
            stream.clock.finish(reason, len(stream.text.token_ids))
        return Output(text, token_ids, samples, reason, event.num_prompt_tokens, len(stream.text.token_ids))

    def _send(self, message: AddRequest | AbortRequest) -> None:
        self.core.send(message)

    def _on_report(self, report: StepReport) -> None:
        """A step finished (or the engine went idle): hand out its tokens and record its metrics."""
        now = time.monotonic()
        self.last_progress = now
        self._running = report.stats.running
        for event in report.events:
            stream = self._streams.get(event.request_id)
            if stream is not None:
                stream.queue.put_nowait((event, report.started))
        m = self.metrics
        if m is None:
            return
        if report.tokens:
            m.labels(m.step_time).observe(report.elapsed)
            m.labels(m.step_tokens).observe(report.tokens)
            m.labels(m.nano_batches).observe(report.nano_batches)
        start, busy = self._busy_window
        busy += report.elapsed
        if now - start >= 1.0:
            m.labels(m.compute_busy).set(min(busy / (now - start), 1.0))
            start, busy = now, 0.0
        self._busy_window = (start, busy)
        stats = report.stats
        m.observe_engine(stats.running, self.num_waiting, stats.kv_usage, stats.prefix_queries, stats.prefix_hits,
                         stats.preemptions)

    def _on_failure(self, reason: str) -> None:
        """The engine core died: every open request ends with EngineFailure (503), and /health fails."""
        self._failure, self._running = reason, 0
        for stream in self._streams.values():
            stream.queue.put_nowait(None)
        if self.metrics is not None:  # nothing runs or waits in a dead engine: the gauges say so, not its last step
            self.metrics.observe_engine(0, 0, 0.0, 0, 0, 0)
            self.metrics.labels(self.metrics.compute_busy).set(0.0)


class RequestHandle:
    """One request's outputs as an async iterator; ends after the output that carries a finish reason."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream):
        self.engine, self.request_id, self.stream = engine, request_id, stream
        self.finished = False

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Output:
        if self.finished:
            raise StopAsyncIteration
        queue = self.stream.queue
        events = [await queue.get()]
        while not queue.empty():  # catch up in one Output when the client reads slowly
            events.append(queue.get_nowait())
        if None in events:  # the engine core failed
            self.finished = True
            self.engine._streams.pop(self.request_id, None)
            raise EngineFailure(self.engine._failure or "the engine failed")
        output = self.engine._output(self.request_id, self.stream, events)
        if output.finish_reason is not None:
            self.finished = True
            self.engine._streams.pop(self.request_id, None)
        return output

    def abort(self) -> None:
        """Stop the request if it is still going (idempotent)."""
        if self.finished:
            return
        self.finished = True
        self.engine._streams.pop(self.request_id, None)
        self.engine._send(AbortRequest(self.request_id, Status.FINISHED_ABORTED))
        self.stream.clock.finish(Status.FINISHED_ABORTED.value, len(self.stream.text.token_ids))

