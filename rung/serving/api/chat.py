"""POST /v1/chat/completions: messages rendered by the model's chat template → n assistant replies, whole or
streamed (the first chunk of each choice carries the role)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rung.serving.api.errors import APIError
from rung.serving.api.protocol import ChatCompletionRequest
from rung.serving.api.response_bodies import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionResponse,
                                        ChatDelta, ChatLogprobs, ChatMessageOut, FunctionCallOut, TokenLogprob,
                                        ToolCallDelta, ToolCallOut, TopLogprob, Usage, body)
from rung.serving.api.state import ServerState
from rung.serving.api.streaming import Choice, collect, event_stream, merge, sse
from rung.serving.api.tool_calls import HermesFormat
from rung.serving.core.structured import StructuredOutput
from rung.serving.engine.client import Output, RequestStream

router = APIRouter()


def logprobs_of(state: ServerState, outputs: list[Output]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float | None) -> dict:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for output in outputs:
        for token_id, sample in zip(output.token_ids, output.samples):
            content.append(TokenLogprob(**entry(token_id, sample.logprob), top_logprobs=[
                TopLogprob(**entry(t, lp)) for t, lp in sample.top_logprobs.items()]))
    return ChatLogprobs(content=content)


@dataclass
class ChatRun:
    """A started chat request: its prompt, one stream per choice, and the tool-call format to read its replies with
    (None when no tools were offered)."""

    prompt: list[int]
    streams: list[RequestStream]
    tool_format: HermesFormat | None


async def start_chat(state: ServerState, request: ChatCompletionRequest, logprobs: int | None = None) -> ChatRun:
    """Render, validate and start a chat request — for /v1/chat/completions and /v1/responses alike."""
    functions, fmt = request.functions(), state.tool_format
    if functions and fmt is None:
        raise APIError(400, "this model's chat template shows no tool-call format rung can read; serve it with "
                            "--tool-call-parser", param="tools")
    forced = request.forced_functions()
    tool_grammar = StructuredOutput("grammar", fmt.grammar(forced, request.parallel_tool_calls)) if forced else None
    prompt = await state.chat_prompt(request.messages, functions)
    streams = state.start(request, [prompt], request.max_completion_tokens or request.max_tokens, logprobs,
                          tool_grammar)
    return ChatRun(prompt, streams, fmt if functions else None)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(request: ChatCompletionRequest, raw: Request):
    state: ServerState = raw.app.state.rung
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    run = await start_chat(state, request, logprobs)
    prompt, streams, fmt = run.prompt, run.streams, run.tool_format
    choices = [Choice() for _ in streams]
    rid, created, model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), state.config.model_name
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    def usage() -> Usage:
        return Usage.of(len(prompt), sum(c.output_tokens for c in choices))

    if request.stream:
        readers = [fmt.reader() if fmt else None for _ in streams]
        calls_sent = [0] * len(streams)

        def chunk(index: int, delta: ChatDelta, output: Output | None, finish_reason: str | None) -> str:
            return sse(ChatCompletionChunk(**head, choices=[ChatChunkChoice(
                index=index, delta=delta, finish_reason=finish_reason,
                logprobs=logprobs_of(state, [output]) if output and logprobs is not None else None)]))

        def delta(index: int, output: Output) -> ChatDelta:
            """The output's text, or with tools on, its text outside calls and the calls it completed."""
            reader = readers[index]
            if reader is None:
                return ChatDelta(content=output.text) if output.text else ChatDelta()
            text, calls = reader.feed(output.text)
            if output.finish_reason:
                text += reader.finish()
            first, calls_sent[index] = calls_sent[index], calls_sent[index] + len(calls)
            fields = {"content": text} if text else {}
            if calls:
                fields["tool_calls"] = [ToolCallDelta(index=first + k, id=c.id, type="function", function=(
                    FunctionCallOut(name=c.name, arguments=c.arguments))) for k, c in enumerate(calls)]
            return ChatDelta(**fields)

        async def events():
            for index in range(len(streams)):
                yield chunk(index, ChatDelta(role="assistant", content=""), None, None)
            async for index, output in merge(streams, state.open_requests):
                choices[index].add(output)
                change = delta(index, output)  # first: it counts the calls this output completes
                finish = output.finish_reason and ("tool_calls" if calls_sent[index] else output.finish_reason)
                yield chunk(index, change, output, finish)
            if request.stream_options and request.stream_options.include_usage:
                yield sse(ChatCompletionChunk(**head, choices=[], usage=usage()))
            yield sse("[DONE]")

        return event_stream(events())
    await collect(raw, streams, choices, state.open_requests)
    replies = [reply(i, c, fmt, logprobs_of(state, c.outputs) if logprobs is not None else None)
               for i, c in enumerate(choices)]
    return JSONResponse(body(ChatCompletionResponse(id=rid, object="chat.completion", created=created, model=model,
                                                    choices=replies, usage=usage())))


def reply(index: int, choice: Choice, fmt: HermesFormat | None, logprobs: ChatLogprobs | None) -> ChatChoice:
    """A whole choice; with tools offered, the calls in its text become `tool_calls` (finish_reason
    'tool_calls')."""
    content, calls = (choice.text, []) if fmt is None else fmt.parse(choice.text)
    if not calls:
        return ChatChoice(index=index, message=ChatMessageOut(role="assistant", content=choice.text),
                          finish_reason=choice.finish_reason, logprobs=logprobs)
    message = ChatMessageOut(role="assistant", content=content, tool_calls=[
        ToolCallOut(id=c.id, type="function", function=FunctionCallOut(name=c.name, arguments=c.arguments))
        for c in calls])
    return ChatChoice(index=index, message=message, finish_reason="tool_calls", logprobs=logprobs)
