"""Tool calls: the format a model writes them in, read back out of its text (whole, or as it streams), and the
grammar that makes `tool_choice: "required"` or a named function always produce a valid call.

One class per format; `hermes` is the one rung's exports use (their chat template lists the tools and shows it):
each call is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, several calls one per line, as Hermes
2 Pro, Qwen 2.5 and many fine-tunes write them. A server picks the format with `--tool-call-parser`, or from the
chat template when it writes `<tool_call>`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class HermesFormat:
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"

    def grammar(self, functions: list[dict], parallel: bool) -> str:
        """A Lark grammar (llguidance's dialect) whose every sentence is one call — or, with `parallel`, several —
        of one of `functions` (OpenAI function objects), its arguments valid for the function's JSON schema."""
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                  "properties": {"name": {"const": f["name"]},
                                 "arguments": f.get("parameters") or {"type": "object"}}} for f in functions]
        schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
        schema["x-guidance"] = {"whitespace_flexible": False}
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                f"call: {json.dumps(self.start + chr(10))} body {json.dumps(chr(10) + self.end)}\n"
                f"body: %json {json.dumps(schema)}")

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(the text outside the calls, or None when there is none; the calls) — a block that is not a call's
        JSON stays in the text."""
        reader = self.reader()
        content, calls = reader.feed(text)
        content = (content + reader.finish()).strip()
        return content or None, calls

    def reader(self) -> ToolCallReader:
        return ToolCallReader(self)

    def call(self, block: str) -> ToolCall | None:
        try:
            call = json.loads(block)
        except ValueError:
            return None
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)
                and isinstance(call.get("arguments", {}), dict)):
            return None
        return ToolCall(f"call_{secrets.token_hex(12)}", call["name"], json.dumps(call.get("arguments", {})))


class ToolCallReader:
    """Reads a streamed text: returns the text that is surely not part of a call as soon as it is known, holding
    back only what could still become a call's opening tag, and each call once its closing tag has arrived."""

    def __init__(self, fmt: HermesFormat):
        self.fmt, self.buffer, self.inside = fmt, "", False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        content, calls = [], []
        while True:
            if not self.inside:
                at = self.buffer.find(self.fmt.start)
                if at < 0:
                    keep = _partial_tag(self.buffer, self.fmt.start)
                    content.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return "".join(content), calls
                content.append(self.buffer[:at])
                self.buffer, self.inside = self.buffer[at + len(self.fmt.start):], True
            at = self.buffer.find(self.fmt.end)
            if at < 0:
                return "".join(content), calls
            block = self.buffer[:at]
            call = self.fmt.call(block.strip())
            if call is None:
                content.append(self.fmt.start + block + self.fmt.end)
            else:
                calls.append(call)
            self.buffer, self.inside = self.buffer[at + len(self.fmt.end):], False

    def finish(self) -> str:
        """The text left when the stream ends: what was held back, and an unclosed call as text."""
        rest = (self.fmt.start if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        return rest


def _partial_tag(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


TOOL_CALL_FORMATS: dict[str, HermesFormat] = {"hermes": HermesFormat()}


def format_for_template(template: str | None) -> HermesFormat | None:
    """The format a chat template shows the model, when rung knows it."""
    return next((fmt for fmt in TOOL_CALL_FORMATS.values() if template and fmt.start in template), None)
