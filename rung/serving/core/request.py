"""A request's state as the scheduler sees it: tokens so far, how many have KV, and when it must stop."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

from rung.serving.core.params import SamplingParams


class Status(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # an end-of-sequence or stop token
    FINISHED_LENGTH = "length"  # max_tokens reached
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_ids: frozenset[int] = frozenset()  # the model's end-of-sequence ids (ignore_eos skips them)
    priority: int = 0  # lower runs first, as in vLLM; ties go first-come-first-served
    arrival: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in the cache, or is being computed by a scheduled step
    num_pending: int = 0  # tokens planned steps will sample, not yet known (up to 2: in flight and planned next)
    num_preemptions: int = 0
    status: Status = Status.WAITING
    # prompt then output, kept as tokens arrive: the scheduler reads it every step, so it is never rebuilt
    all_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_scheduled_tokens(self) -> int:
        """Known tokens plus those a step in flight will sample: the length the next step continues from."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def ends_with_pending(self) -> bool:
        """The token in flight is its last by length, so no later step needs it (a stop token can't be known)."""
        return self.num_pending > 0 and len(self.output_token_ids) + self.num_pending >= self.params.max_tokens

    def append(self, token_id: int) -> None:
        """Add a sampled token and finish the request if a stop rule says so."""
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        produced, p = len(self.output_token_ids), self.params
        stops = token_id in p.stop_token_ids or (token_id in self.eos_token_ids and not p.ignore_eos)
        if stops and produced >= p.min_tokens:
            self.status = Status.FINISHED_STOPPED
        elif produced >= p.max_tokens:
            self.status = Status.FINISHED_LENGTH
