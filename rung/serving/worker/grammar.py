"""The token masks of structured outputs: one llguidance matcher per constrained request, advanced by every token
the request samples, and a step's masks filled on llguidance's threads while the model's forward runs.

A request's first mask creates its matcher from the grammar (`core/structured.py`); the grammar's compiled state is
kept per constraint and copied for each new request, so a schema is compiled once however many requests use it,
and the compilation happens on the mask thread, overlapped with the forward, not on the engine's step. When the
grammar is complete the mask leaves only the end-of-sequence tokens, so the request stops with valid output.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rung.serving.core.structured import StructuredOutput


COMPILED_KEPT = 256  # constraints whose compiled state is kept (least recently used dropped first)


class GrammarMasks:
    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int]):
        self.model_dir, self.vocab_size, self.eos_token_ids = str(model_dir), vocab_size, eos_token_ids
        self._tokenizer = None  # llguidance's view of the vocabulary, built on first use (tens of ms)
        self._compiled: dict[StructuredOutput, object] = {}  # a fresh matcher per constraint, copied per request
        self._matchers: dict[str, object] = {}
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="rung-grammar")
        self._executor = None

    def _matcher(self, request_id: str, structured: StructuredOutput):
        matcher = self._matchers.get(request_id)
        if matcher is None:
            from llguidance import LLMatcher

            if self._tokenizer is None:
                from llguidance.hf import from_tokenizer
                from transformers import AutoTokenizer

                self._tokenizer = from_tokenizer(AutoTokenizer.from_pretrained(self.model_dir),
                                                 n_vocab=self.vocab_size, eos_token=self.eos_token_ids)
            template = self._compiled.pop(structured, None)
            if template is None:
                template = LLMatcher(self._tokenizer, structured.grammar())
                if len(self._compiled) >= COMPILED_KEPT:
                    del self._compiled[next(iter(self._compiled))]  # the least recently used
            self._compiled[structured] = template
            matcher = self._matchers[request_id] = template.deep_copy()
        return matcher

    def fill(self, rows: list[tuple[str, StructuredOutput]]) -> Future:
        """Start filling one mask row per (request id, constraint) on the mask thread; the Future gives the rows'
        masks as `additive` makes them."""
        return self._thread.submit(self._fill, rows)

    def _fill(self, rows: list[tuple[str, StructuredOutput]]) -> torch.Tensor:
        from llguidance import LLExecutor
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        matchers = [(self._matcher(request_id, structured), index)
                    for index, (request_id, structured) in enumerate(rows)]
        bitmask = allocate_token_bitmask(len(rows), self.vocab_size)
        if self._executor is None:
            self._executor = LLExecutor()
        fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        return additive(unpack(bitmask, self.vocab_size))

    def accept(self, request_id: str, token_id: int) -> None:
        """Advance the request's matcher by the token it sampled."""
        self._matchers[request_id].consume_token(token_id)

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """llguidance's packed int32 bitmask [rows, ceil(vocab / 32)] (bit i of word w: token 32 w + i) as a bool
    tensor [rows, vocab]."""
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab_size].astype(bool))


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """Masks as the sampler adds them to the logits: 0 where a token is allowed, -inf elsewhere; a row that allows
    nothing (a finished grammar's request still in an overlapped step, its token discarded) adds nothing. Built
    here, on the mask thread, so the step itself pays one addition."""
    blocked = ~allowed & allowed.any(dim=-1, keepdim=True)
    return torch.zeros(allowed.shape).masked_fill_(blocked, float("-inf"))
