"""The token masks of structured outputs: one llguidance matcher per constrained request, advanced by every token
the request samples, and a step's masks filled on llguidance's threads while the model's forward runs.

A constraint is compiled on the mask thread as soon as its request arrives (`prepare`), while the request waits and
its prompt prefills, so its first mask finds it ready; the compiled state is kept per constraint and copied for each
new request, so a schema is compiled once however many requests use it. Nothing of it runs on the engine's step. When the
grammar is complete the mask leaves only the end-of-sequence tokens, so the request stops with valid output.

JSON mode (`json_object`) also ends on time: once the tokens of the shortest completion of the JSON written so far
(`core/json_closing.py`) would no longer fit in the request's max_tokens, the mask allows only the next of them, so
the output is a whole object when the budget runs out rather than one cut inside a string. A schema's required
properties have no such short completion, so `json_schema` gets no such steering.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from rung.serving.core.json_closing import closing
from rung.serving.core.params import SamplingParams
from rung.serving.core.structured import StructuredOutput


COMPILED_KEPT = 256  # constraints whose compiled state is kept (least recently used dropped first)
# JSON mode looks for its ending only this close to the budget: an ending longer than this (a very deep object)
# is not steered, and the request may be cut as without it
MAX_CLOSING_TOKENS = 64
# steered this many tokens early: one freely sampled token can lengthen the ending by several (a key opens `":null`)
ENDING_MARGIN = 4


class GrammarMasks:
    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: list[int]):
        self.model_dir, self.vocab_size, self.eos_token_ids = str(model_dir), vocab_size, eos_token_ids
        self._text_tokenizer = None  # the model's tokenizer, loaded on first use
        self._tokenizer = None  # llguidance's view of its vocabulary, built on first use (tens of ms)
        self._compiled: dict[StructuredOutput, object] = {}  # a fresh matcher per constraint, copied per request
        self._matchers: dict[str, object] = {}
        self._accepted: dict[str, list[int]] = {}  # each request's tokens so far, for JSON mode's ending
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="rung-grammar")
        self._executor = None

    def prepare(self, structured: StructuredOutput) -> None:
        """Compile a constraint on the mask thread now — when its request arrives, while it waits and prefills —
        so that its first mask finds it ready (and the vocabulary's view built, the first time)."""
        self._thread.submit(self._template, structured)

    def _template(self, structured: StructuredOutput):
        """The constraint's compiled matcher (kept, least recently used dropped), compiled on first use."""
        from llguidance import LLMatcher

        if self._tokenizer is None:
            from llguidance.hf import from_tokenizer
            from transformers import AutoTokenizer

            self._text_tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            self._tokenizer = from_tokenizer(self._text_tokenizer, n_vocab=self.vocab_size,
                                             eos_token=self.eos_token_ids)
        template = self._compiled.pop(structured, None)
        if template is None:
            template = LLMatcher(self._tokenizer, structured.grammar())
            if len(self._compiled) >= COMPILED_KEPT:
                del self._compiled[next(iter(self._compiled))]
        self._compiled[structured] = template
        return template

    def _matcher(self, request_id: str, structured: StructuredOutput):
        matcher = self._matchers.get(request_id)
        if matcher is None:
            matcher = self._matchers[request_id] = self._template(structured).deep_copy()
            self._accepted[request_id] = []
        return matcher

    def fill(self, rows: list[tuple[str, SamplingParams]]) -> Future:
        """Start filling one mask row per (request id, its parameters) on the mask thread; the Future gives the
        rows' masks as `additive` makes them."""
        return self._thread.submit(self._fill, rows)

    def _fill(self, rows: list[tuple[str, SamplingParams]]) -> torch.Tensor:
        from llguidance import LLExecutor
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par

        matchers = [(self._matcher(request_id, params.structured), index)
                    for index, (request_id, params) in enumerate(rows)]
        bitmask = allocate_token_bitmask(len(rows), self.vocab_size)
        if self._executor is None:
            self._executor = LLExecutor()
        fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        allowed = unpack(bitmask, self.vocab_size)
        for index, (request_id, params) in enumerate(rows):
            if params.structured.kind == "json_object":
                self._end_on_time(allowed[index], request_id, params.max_tokens)
        return additive(allowed)

    def _end_on_time(self, allowed: torch.Tensor, request_id: str, max_tokens: int) -> None:
        """JSON mode: when the shortest completion (plus a margin) only just fits in what is left of the budget,
        allow only its next token (if the grammar allows it: a tokenization the grammar would refuse keeps the grammar's mask)."""
        accepted = self._accepted[request_id]
        left = max_tokens - len(accepted)
        if left > MAX_CLOSING_TOKENS:
            return
        text = self._text_tokenizer.decode(accepted)
        ending = self._text_tokenizer.encode(closing(text), add_special_tokens=False)
        if ending and len(ending) + ENDING_MARGIN >= left and allowed[ending[0]]:
            allowed.zero_()
            allowed[ending[0]] = True

    def accept(self, request_id: str, token_id: int) -> None:
        """Advance the request's matcher by the token it sampled."""
        self._matchers[request_id].consume_token(token_id)
        self._accepted[request_id].append(token_id)

    def release(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        self._accepted.pop(request_id, None)


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
