"""What the HTTP layer needs of an engine, declared once: `EngineClient`, implemented by rung's AsyncEngine
(`engine/async_engine.py`) and by the vLLM backend (`backends/vllm.py`); a test checks both against it.

The API never reaches past this surface (vLLM's `EngineClient` plays the same part between its API server and its
engine): it validates a request, starts it and reads its Outputs, aborts it when the client goes away, and reads
the engine's health and queue figures for admission control and drain.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from rung.serving.core.outputs import Sample
from rung.serving.core.params import SamplingParams


class EngineFailure(Exception):
    """The engine itself failed (not the request): the server answers 503 and /health fails."""


@dataclass(frozen=True)
class Output:
    """What a request gained since its last Output."""

    text: str
    token_ids: list[int]
    samples: list[Sample]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@runtime_checkable
class RequestStream(Protocol):
    """One request's Outputs as an async iterator; ends after the Output that carries a finish reason and raises
    EngineFailure if the engine dies meanwhile."""

    request_id: str

    def __aiter__(self) -> AsyncIterator[Output]: ...

    async def __anext__(self) -> Output: ...

    def abort(self) -> None:
        """Stop the request if it is still going (idempotent); its blocks are freed."""


@runtime_checkable
class EngineClient(Protocol):
    """The engine as the API server sees it."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def healthy(self) -> bool:
        """Alive and, when there is work, making progress."""

    @property
    def num_unfinished(self) -> int:
        """Requests started and not yet finished (what a drain waits for)."""

    @property
    def num_waiting(self) -> int:
        """Requests admitted but not running yet (what the queue bound counts)."""

    @property
    def num_waiting_tokens(self) -> int:
        """Prompt tokens of requests that have produced nothing yet."""

    def start(self) -> None:
        """Begin serving (inside the server's event loop)."""

    def stop(self) -> None: ...

    def describe(self) -> str:
        """One line for the server's startup message."""

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise SamplingError naming the field if the request can never run."""

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, stop: list[str] | tuple[str, ...] = (),
                 priority: int = 0) -> RequestStream:
        """Queue one request now; raises SamplingError before anything is queued if it can never run."""
