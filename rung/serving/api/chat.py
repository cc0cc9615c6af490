"""POST /v1/chat/completions: messages rendered by the model's chat template → n assistant replies, whole or
streamed (the first chunk of each choice carries the role)."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rung.serving.api.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                       ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatMessageOut, TokenLogprob,
                                       TopLogprob, Usage, body)
from rung.serving.api.state import ServerState
from rung.serving.api.streaming import Choice, collect, event_stream, merge, sse
from rung.serving.engine.client import Output

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


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(request: ChatCompletionRequest, raw: Request):
    state: ServerState = raw.app.state.rung
    prompt = await state.chat_prompt(request.messages)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    streams = state.start(request, [prompt], request.max_completion_tokens or request.max_tokens, logprobs)
    choices = [Choice() for _ in streams]
    rid, created, model = f"chatcmpl-{secrets.token_hex(12)}", int(time.time()), state.config.model_name
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    def usage() -> Usage:
        return Usage.of(len(prompt), sum(c.output_tokens for c in choices))

    if request.stream:
        def chunk(index: int, delta: ChatDelta, output: Output | None) -> str:
            return sse(ChatCompletionChunk(**head, choices=[ChatChunkChoice(
                index=index, delta=delta, finish_reason=output.finish_reason if output else None,
                logprobs=logprobs_of(state, [output]) if output and logprobs is not None else None)]))

        async def events():
            for index in range(len(streams)):
                yield chunk(index, ChatDelta(role="assistant", content=""), None)
            async for index, output in merge(streams, state.open_requests):
                choices[index].add(output)
                yield chunk(index, ChatDelta(content=output.text) if output.text else ChatDelta(), output)
            if request.stream_options and request.stream_options.include_usage:
                yield sse(ChatCompletionChunk(**head, choices=[], usage=usage()))
            yield sse("[DONE]")

        return event_stream(events())
    await collect(raw, streams, choices, state.open_requests)
    replies = [ChatChoice(index=i, message=ChatMessageOut(role="assistant", content=c.text),
                          finish_reason=c.finish_reason,
                          logprobs=logprobs_of(state, c.outputs) if logprobs is not None else None)
               for i, c in enumerate(choices)]
    return JSONResponse(body(ChatCompletionResponse(id=rid, object="chat.completion", created=created, model=model,
                                                    choices=replies, usage=usage())))
