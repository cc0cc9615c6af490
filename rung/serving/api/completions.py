"""POST /v1/completions: a prompt (text, token ids, or a batch of either) → n completions each, whole or streamed."""

from __future__ import annotations

import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rung.serving.api.errors import APIError
from rung.serving.api.protocol import CompletionRequest
from rung.serving.api.response_bodies import CompletionChoice, CompletionLogprobs, CompletionResponse, Usage, body
from rung.serving.api.state import ServerState
from rung.serving.api.streaming import Choice, collect, event_stream, merge, sse
from rung.serving.engine.client import Output

router = APIRouter()


async def prompts_of(state: ServerState, request: CompletionRequest) -> list[tuple[list[int], str]]:
    """Each prompt's token ids and the text `echo` repeats: a text prompt as sent, token ids decoded without the
    special tokens (no `<|bos|>` in front of the echo)."""
    prompt = request.prompt
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    prompts = [(await state.encode(p), p) if isinstance(p, str) else
               (list(p), state.tokenizer.decode(p, skip_special_tokens=True) if request.echo else "") for p in prompt]
    if not prompts or any(not ids for ids, _ in prompts):
        raise APIError(400, "the prompt is empty", param="prompt")
    return prompts


def logprobs_of(state: ServerState, outputs: list[Output]) -> CompletionLogprobs:
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
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
    if request.echo and request.logprobs is not None:
        raise APIError(400, "echo with logprobs would need the prompt's logprobs, which rung does not compute; "
                            "drop one of them", param="echo")
    prompts = await prompts_of(state, request)
    streams = state.start(request, [ids for ids, _ in prompts], request.max_tokens, request.logprobs)
    choices = [Choice() for _ in streams]
    echo = [prompts[i // request.n][1] if request.echo else "" for i in range(len(streams))]
    head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": state.config.model_name}
    wants_logprobs = request.logprobs is not None

    def usage() -> Usage:
        return Usage.of(sum(len(ids) for ids, _ in prompts), sum(c.output_tokens for c in choices))

    if request.stream:
        async def events():
            echoed = set()
            async for index, output in merge(streams, state.open_requests):
                choices[index].add(output)
                text = output.text if index in echoed else echo[index] + output.text
                echoed.add(index)
                logprobs = logprobs_of(state, [output]) if wants_logprobs else None
                yield sse(CompletionResponse(**head, choices=[CompletionChoice(
                    index=index, text=text, logprobs=logprobs, finish_reason=output.finish_reason)]))
            if request.stream_options and request.stream_options.include_usage:
                yield sse(CompletionResponse(**head, choices=[], usage=usage()))
            yield sse("[DONE]")

        return event_stream(events())
    await collect(raw, streams, choices, state.open_requests)
    return JSONResponse(body(CompletionResponse(**head, choices=[
        CompletionChoice(index=i, text=echo[i] + c.text, finish_reason=c.finish_reason,
                         logprobs=logprobs_of(state, c.outputs) if wants_logprobs else None)
        for i, c in enumerate(choices)], usage=usage())))
