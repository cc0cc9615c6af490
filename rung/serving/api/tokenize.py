"""POST /tokenize and /detokenize (vLLM's extensions): a prompt or chat messages to token ids, and back."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rung.serving.api.errors import APIError
from rung.serving.api.protocol import DetokenizeRequest, TokenizeRequest
from rung.serving.api.response_bodies import DetokenizeResponse, TokenizeResponse, body
from rung.serving.api.state import ServerState

router = APIRouter()


@router.post("/tokenize", response_model=TokenizeResponse)
async def tokenize(request: TokenizeRequest, raw: Request):
    state: ServerState = raw.app.state.rung
    state.check_model(request.model)
    if request.messages:
        tokens = await state.chat_prompt(request.messages)
    elif request.prompt is not None:
        tokens = await state.encode(request.prompt, request.add_special_tokens)
    else:
        raise APIError(400, "give a prompt or messages", param="prompt")
    return JSONResponse(body(TokenizeResponse(tokens=tokens, count=len(tokens),
                                              max_model_len=state.engine.max_model_len)))


@router.post("/detokenize", response_model=DetokenizeResponse)
async def detokenize(request: DetokenizeRequest, raw: Request):
    state: ServerState = raw.app.state.rung
    state.check_model(request.model)
    vocab = state.engine.vocab_size
    if any(not 0 <= t < vocab for t in request.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
    return JSONResponse(body(DetokenizeResponse(prompt=state.tokenizer.decode(request.tokens))))
