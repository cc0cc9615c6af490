"""The messages between the server and the engine core: one frozen dataclass per kind, plain data (they cross a
process boundary by pickling through a pipe), and one `dispatch` that routes a message by its type.

    server → engine:  AddRequest, AbortRequest, Shutdown
    engine → server:  EngineReady (once, after loading) or LoadFailed, then StepReport per step, EngineFailed

A message of a type the receiver has no handler for is a bug in rung, not a user error: `dispatch` raises
ProtocolError, and the receiver fails loudly (the server answers 503 and /health fails) instead of guessing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from rung.serving.core.outputs import Sample
from rung.serving.core.params import SamplingParams
from rung.serving.core.request import Status


@dataclass(frozen=True)
class EngineLimits:
    """What the server validates requests against and describes itself with, read from the built engine."""

    max_model_len: int
    vocab_size: int
    kv_blocks: tuple[int, int]  # (count, tokens per block)
    async_scheduling: bool
    prefix_caching: bool
    rank_weight_bytes: tuple[int, ...] = ()  # under tensor parallelism: the bytes of weights each rank holds


@dataclass(frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0


@dataclass(frozen=True)
class TokenEvent:
    """What one request gained in a step: a sampled token, and whether that finished it."""

    request_id: str
    token_id: int
    sample: Sample
    finish_reason: str | None  # "stop", "length", "abort" once finished
    num_prompt_tokens: int
    num_output_tokens: int


# -- server → engine -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0


@dataclass(frozen=True)
class AbortRequest:
    request_id: str
    status: Status = Status.FINISHED_ABORTED  # a matched stop string finishes a request as stopped


@dataclass(frozen=True)
class Shutdown:
    """Stop stepping and exit."""


# -- engine → server -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineReady:
    limits: EngineLimits


@dataclass(frozen=True)
class LoadFailed:
    """The engine could not be built (a bad model folder, a bad setting): the user's problem, said as is."""

    reason: str
    field: str | None = None  # the engine setting it names, when it is one (a ConfigError's field)


@dataclass(frozen=True)
class StepReport:
    """One step as the server sees it."""

    events: list[TokenEvent]
    started: float  # time.monotonic() when the step began (system-wide on Linux, so comparable across processes)
    elapsed: float
    tokens: int
    nano_batches: int
    stats: EngineStats


@dataclass(frozen=True)
class EngineFailed:
    """The engine broke while stepping: every open request ends with 503."""

    reason: str


class ProtocolError(RuntimeError):
    """A message nobody handles: a bug in rung."""


M = TypeVar("M")


def dispatch(message: object, handlers: Mapping[type, Callable[[Any], M]]) -> M:
    """Call the handler registered for exactly `message`'s type; anything else raises ProtocolError."""
    handler = handlers.get(type(message))
    if handler is None:
        expected = ", ".join(sorted(kind.__name__ for kind in handlers))
        raise ProtocolError(f"unknown message {type(message).__name__} ({message!r:.200}); expected one of "
                            f"{expected}: this is a bug in rung")
    return handler(message)
