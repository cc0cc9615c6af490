"""Sampling parameters: what a request may ask for, validated with errors that name the field. Torch-free, so
the scheduler and the API layer can use them."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from rung.errors import ConfigError
from rung.serving.core.structured import StructuredOutput


class SamplingError(ConfigError):
    """An invalid request parameter; `field` names it (the API reports it as the error's `param`)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) = off
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # top alternatives returned with each token
    skip_special_tokens: bool = True  # the text leaves out special tokens (<|pad|>, role markers, EOS), as vLLM's
    spaces_between_special_tokens: bool = True  # when kept: a space between adjacent special tokens, as vLLM's
    # (token id, bias) pairs added to the model's logits before anything else (OpenAI's logit_bias); the
    # vocabulary bound is checked with the prompt (core/validation.py)
    logit_bias: tuple[tuple[int, float], ...] = ()
    # what the output must match (JSON, a schema, a regex, choices, a grammar): a token mask before sampling
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be between 0 and max_tokens"),
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1 (off) or >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
            ("n", self.n >= 1, "must be at least 1"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be between 0 and 20"),
        ]
        for name, ok, message in checks:
            if not ok:
                raise SamplingError(name, f"{message}, got {getattr(self, name)!r}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100 <= bias <= 100:
                raise SamplingError("logit_bias", f"needs token ids >= 0 and biases in [-100, 100], got {token}: "
                                    f"{bias}")

    def for_sample(self, index: int) -> SamplingParams:
        """The `index`-th of n samples: its own reproducible stream when a seed is given."""
        return self if self.seed is None else replace(self, seed=self.seed + index)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def processed(self) -> bool:
        """Whether the sampler must process this row's logits even for a greedy pick."""
        return self.penalised or bool(self.logit_bias)

    @property
    def penalised(self) -> bool:
        """Whether sampling reads the request's token history."""
        return self.repetition_penalty != 1.0 or bool(self.presence_penalty) or bool(self.frequency_penalty)
