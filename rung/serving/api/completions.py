"""POST /v1/completions: a prompt (text, token ids, or a batch of either) → n completions each, whole or streamed."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from rung.serving.api.errors import APIError
from rung.serving.api.protocol import (CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse,
                                       Usage, body)
from rung.serving.api.state import ServerState
from rung.serving.api.streaming import Choice, collect, merge, sse
from rung.serving.engine.client import Output

router = APIRouter()


def prompts_of(state: ServerState, request: CompletionRequest) -> list[list[int]]:
    prompt = request.prompt
    if isinstance(prompt, str):
        prompts = [state.encode(prompt)]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = [state.encode(p) if isinstance(p, str) else list(p) for p in prompt]
    if not prompts or any(not p for p in prompts):
        raise APIError(400, "the prompt is empty", param="prompt")
    return prompts


def logprobs_of(state: ServerState, outputs: list[Output], offset: int) -> CompletionLogprobs:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for output in outputs:
        for token_id, sample in zip(output.token_ids, output.samples):
            piece = state.token_text(token_id)
            tokens.append(piece)
            token_logprobs.append(sample.logprob)
            top.append({state.token_text(t): lp for t, lp in sample.top_logprobs.items()})
            offsets.append(offset)
            offset += len(piece)
    return CompletionLogprobs(tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top, text_offset=offsets)


@router.post("/v1/completions", response_model=CompletionResponse)
async def completions(request: CompletionRequest, raw: Request):
    state: ServerState = raw.app.state.rung
    prompts = prompts_of(state, request)
    streams = state.start(request, prompts, request.max_tokens, request.logprobs)
    choices = [Choice(len(prompts[i // request.n])) for i in range(len(streams))]
    echo = [state.tokenizer.decode(prompts[i // request.n]) if request.echo else "" for i in range(len(streams))]
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": state.config.model_name}
    wants_logprobs = request.logprobs is not None

    def usage() -> Usage:
        return Usage.of(sum(len(p) for p in prompts) * request.n, sum(c.output_tokens for c in choices))

    if request.stream:
        async def events():
            echoed = set()
            async for index, output in merge(streams):
                choices[index].add(output)
                text = output.text if index in echoed else echo[index] + output.text
                echoed.add(index)
                logprobs = logprobs_of(state, [output], 0) if wants_logprobs else None
                yield sse(CompletionResponse(**head, choices=[CompletionChoice(
                    index=index, text=text, logprobs=logprobs, finish_reason=output.finish_reason)]))
            if request.stream_options and request.stream_options.include_usage:
                yield sse(CompletionResponse(**head, choices=[], usage=usage()))
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")
    await collect(raw, streams, choices)
    return JSONResponse(body(CompletionResponse(**head, choices=[
        CompletionChoice(index=i, text=echo[i] + c.text, finish_reason=c.finish_reason,
                         logprobs=logprobs_of(state, c.outputs, len(echo[i])) if wants_logprobs else None)
        for i, c in enumerate(choices)], usage=usage())))
