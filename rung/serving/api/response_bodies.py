"""The OpenAI API's response bodies as pydantic models. Written with `body()` / `sse()`, which keep exactly the
fields the handler set, so each body has the keys OpenAI's has: no `usage` on a stream's chunks but the last, an
empty `delta` where a chunk carries no text, while required fields such as `logprobs` and `finish_reason` are always
there (null or not)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class Response(BaseModel):
    """A response body. Written with `body()` / `sse()`, which keep exactly the fields the handler set: a field
    every body has is therefore required (no default), and an optional one defaults to None and is left unset."""


class ErrorInfo(Response):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Response):
    error: ErrorInfo


class Usage(Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(Response):
    """A whole completion, and (with `object` "text_completion" too) each chunk of a streamed one."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(Response):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Response):
    content: list[TokenLogprob]


class FunctionCallOut(Response):
    name: str
    arguments: str


class ToolCallOut(Response):
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ToolCallDelta(Response):
    index: int
    id: str
    type: Literal["function"]
    function: FunctionCallOut


class ChatMessageOut(Response):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(Response):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(Response):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(Response):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    quantization: str  # rung's: none, int8 or int4 (`--quantization`)


class ModelList(Response):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(Response):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(Response):
    prompt: str


class Status(Response):
    status: str


class Version(Response):
    version: str


def body(response: BaseModel) -> dict[str, Any]:
    """A response as JSON data with exactly the fields its handler set (see the module docstring)."""
    return response.model_dump(exclude_unset=True)
