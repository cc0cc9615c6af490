"""What the model gives back for one request per step, as plain data every layer can hold: the worker makes it,
the engine forwards it, the API formats it (logprobs), whichever engine computed it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float | None  # None unless the request asked for logprobs (as in vLLM: 0 asks for this one alone)
    top_logprobs: dict[int, float]  # the `params.logprobs` most likely tokens
