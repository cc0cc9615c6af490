"""Incremental detokenization with stop strings, for streaming.

Text is released only when it is final: never half of a multi-byte UTF-8 character (a byte-level BPE token may
carry a fragment, which decodes to U+FFFD until its other bytes arrive), and never the start of what may still
become a stop string — that tail is held back until the next token settles it. A matched stop string ends the
request and is not part of its text, as in OpenAI's API. Special tokens are left out of the text (and so out of
stop matching) unless the request keeps them, as vLLM's `skip_special_tokens` does.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"
CONTEXT = 6  # tokens decoded before the new ones, so that a token's leading space or merge renders correctly


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = False, **options) -> str: ...


class TextStream:
    def __init__(self, tokenizer: Decoder, stop: list[str] | tuple[str, ...] = (), skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self._options = {"skip_special_tokens": skip_special_tokens,
                         "spaces_between_special_tokens": spaces_between_special_tokens}
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # settled text so far (may still hold a stop-string prefix at its end)
        self.emitted = 0  # characters of `text` already handed out
        self._offset = 0  # tokens already turned into `text`
        self.stopped = False  # a stop string matched

    def add(self, token_id: int) -> str:
        """Take one token; return the text that became final (possibly empty)."""
        self.token_ids.append(token_id)
        start = max(self._offset - CONTEXT, 0)
        before = self._decode(self.token_ids[start:self._offset])
        after = self._decode(self.token_ids[start:])
        if after.endswith(REPLACEMENT) or not after.startswith(before):
            return ""  # an incomplete character: wait for its remaining bytes
        self.text += after[len(before):]
        self._offset = len(self.token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ended: release everything held back (a dangling partial character is dropped)."""
        if self._offset < len(self.token_ids) and not self.stopped:
            start = max(self._offset - CONTEXT, 0)
            before = self._decode(self.token_ids[start:self._offset])
            self.text += self._decode(self.token_ids[start:])[len(before):].rstrip(REPLACEMENT)
            self._offset = len(self.token_ids)
        return self._release(final=True)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, **self._options)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        for stop in self.stop:
            found = self.text.find(stop, max(self.emitted - len(stop) + 1, 0))
            if found != -1:
                self.text, self.stopped = self.text[:found], True
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        end = max(end, self.emitted)
        delta, self.emitted = self.text[self.emitted:end], end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
