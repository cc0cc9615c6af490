"""The OpenAI-compatible HTTP server (`rung serve`): FastAPI routes over the AsyncEngine.

Everything a client can get wrong is answered in OpenAI's error envelope with the right status, never a 500:
400 validation (with `param`), 401 API key, 404 model, 413 body size, 429 queue full (with Retry-After), 503 not
ready or draining. SIGTERM drains: readiness fails, new work gets 503, in-flight requests finish within the grace
period, then the process exits.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from rung import __version__
from rung.errors import ConfigError, RungError
from rung.serving.async_engine import AsyncEngine, EngineFailure, Output, RequestHandle, seeded
from rung.serving.engine import Engine, EngineConfig
from rung.serving.engine_core import ProcessCore
from rung.serving.metrics import ServeMetrics
from rung.serving.params import SamplingError
from rung.serving.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, Sampling,
                                   TokenizeRequest)

BACKENDS = ("rung", "vllm")
RUNG_ONLY = ("nano_batches", "deterministic", "device")  # engine settings vLLM has no counterpart for
DISCARD_LIMIT = 64 << 20  # an oversized body up to this size is read and dropped before the 413
OPEN_PATHS = ("/health", "/ready", "/version", "/metrics", "/openapi.json", "/docs")


@dataclass
class ServeConfig:
    model_dir: str
    served_model_name: str | None = None
    api_key: str | None = None
    max_queued_requests: int = 256  # waiting (admitted, not yet running) requests before 429
    max_queued_tokens: int | None = None  # prompt tokens of requests not yet producing, before 429; None = no bound
    max_body_bytes: int = 4 << 20
    grace_seconds: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    backend: str = "rung"  # which engine computes: rung's own, or vLLM's (an optional extra)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError("engine", f"must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        for name in RUNG_ONLY if self.backend == "vllm" else ():
            if getattr(self.engine, name):
                raise ConfigError(name, "applies to rung's engine only; leave it unset with the vllm engine")

    @property
    def model_name(self) -> str:
        return self.served_model_name or Path(self.model_dir).resolve().name


def serve_config(args: dict) -> ServeConfig:
    """A ServeConfig from one flat dict of serve and engine fields (the CLI's and a Ray Serve config's `args`)."""
    serve_fields = set(ServeConfig.__dataclass_fields__) - {"engine"}
    unknown = set(args) - serve_fields - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError("args", f"unknown serve settings: {', '.join(sorted(unknown))}")
    return ServeConfig(**{k: v for k, v in args.items() if k in serve_fields},
                       engine=EngineConfig(**{k: v for k, v in args.items() if k not in serve_fields}))


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:  # transformers' ways of saying the folder has no usable tokenizer
        reason = " ".join(str(err).split())
        raise RungError(f"{model_dir} has no tokenizer rung can load: {reason[:300]}") from None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(err: APIError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


class State:
    """What the routes share: the engine, tokenizer, metrics and lifecycle flags."""

    def __init__(self, config: ServeConfig, tokenizer, engine: Engine | None = None):
        self.config, self.tokenizer = config, tokenizer
        self.metrics = ServeMetrics(config.model_name)
        self.metrics.labels(self.metrics.queue_limit).set(config.max_queued_requests)
        if config.backend == "vllm":
            from rung.serving.vllm_engine import VLLMAsyncEngine

            self.engine = VLLMAsyncEngine(config.model_dir, config.engine, self.metrics)
        else:
            self.engine = AsyncEngine(engine or ProcessCore(config.model_dir, config.engine), tokenizer, self.metrics)
        self.ready = False
        self.draining = False

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"model {model[:100]!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model", code="model_not_found")

    def check_capacity(self, requests: int, tokens: int) -> None:
        if self.draining or not self.ready:
            raise APIError(503, "the server is " + ("draining" if self.draining else "starting"),
                           type_="service_unavailable", headers={"Retry-After": "5"})
        if self.engine.num_waiting + requests > self.config.max_queued_requests:
            raise APIError(429, f"the queue is full ({self.config.max_queued_requests} waiting requests); retry "
                                f"later", type_="rate_limit_error", headers={"Retry-After": "1"})
        limit = self.config.max_queued_tokens
        if limit is not None and self.engine.num_waiting_tokens + tokens > limit:
            raise APIError(429, f"the queue is full ({limit} prompt tokens waiting at most); retry later",
                           type_="rate_limit_error", headers={"Retry-After": "1"})

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def chat_prompt(self, messages) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                  tokenize=False, add_generation_prompt=True)
        return self.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def _prompts(state: State, body: CompletionRequest) -> list[list[int]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [state.encode(prompt)]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [state.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _max_tokens(state: State, prompt: list[int], requested: int | None) -> int:
    window = state.engine.max_model_len
    if requested is not None:
        return requested
    if len(prompt) >= window:
        raise APIError(400, f"the prompt has {len(prompt)} tokens; the context window is {window}", param="prompt")
    return window - len(prompt)


async def _merge(streams: list[RequestHandle]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several requests as they come, tagged with the index of their stream. However it ends (the
    client went away, an error), every request still running is aborted."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestHandle) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except BaseException as err:  # noqa: BLE001 — handed to the consumer, which re-raises it
            await queue.put((index, err))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class Choice:
    """One choice's accumulated text, tokens and logprobs."""

    def __init__(self, prompt_tokens: int):
        self.text, self.finish_reason, self.prompt_tokens = "", None, prompt_tokens
        self.output_tokens = 0
        self.outputs: list[Output] = []

    def add(self, output: Output) -> None:
        self.text += output.text
        self.finish_reason = output.finish_reason or self.finish_reason
        self.output_tokens = output.num_output_tokens
        self.outputs.append(output)


def _completion_logprobs(state: State, outputs: list[Output], offset: int) -> dict:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for output in outputs:
        for token_id, sample in zip(output.token_ids, output.samples):
            piece = state.token_text(token_id)
            tokens.append(piece)
            token_logprobs.append(sample.logprob)
            top.append({state.token_text(t): lp for t, lp in sample.top_logprobs.items()})
            offsets.append(offset)
            offset += len(piece)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(state: State, outputs: list[Output]) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = state.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for output in outputs:
        for token_id, sample in zip(output.token_ids, output.samples):
            content.append({**entry(token_id, sample.logprob),
                            "top_logprobs": [entry(t, lp) for t, lp in sample.top_logprobs.items()]})
    return {"content": content}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(config: ServeConfig, engine: Engine | None = None, tokenizer=None) -> FastAPI:
    """The app; the engine (rung's, or vLLM's as `config.backend` says) and the tokenizer load from
    `config.model_dir` unless given."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model_dir)
    state = State(config, tokenizer, engine)

    async def lifespan(app: FastAPI):
        state.engine.start()
        state.ready = True
        yield
        state.ready = False
        state.engine.stop()

    app = FastAPI(title="rung", version=__version__, lifespan=lifespan)
    app.state.rung = state
    m = state.metrics

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, err: APIError):
        return error_response(err)

    @app.exception_handler(SamplingError)
    async def on_sampling_error(_request: Request, err: SamplingError):
        return error_response(APIError(400, str(err), param=err.field))

    @app.exception_handler(EngineFailure)
    async def on_engine_failure(_request: Request, err: EngineFailure):
        return error_response(APIError(503, str(err), type_="service_unavailable"))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, loc = "the body is not valid JSON", []
        elif first.get("type") == "missing":
            message = f"{'.'.join(loc)} is required"
        return error_response(APIError(400, f"{'.'.join(loc) + ': ' if loc else ''}{message}"[:500],
                                       param=".".join(loc) or None))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(APIError(err.status_code, str(err.detail), type_=kind))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if length > config.max_body_bytes:
            if length <= DISCARD_LIMIT:  # read it away, so that clients still sending see the 413, not a reset
                async for _ in request.stream():
                    pass
            response = error_response(APIError(413, f"the body is {length} bytes; the limit is "
                                                    f"{config.max_body_bytes}", code="request_too_large"))
        elif config.api_key and not request.url.path.startswith(OPEN_PATHS) and not secrets.compare_digest(
                request.headers.get("authorization", ""), f"Bearer {config.api_key}"):
            response = error_response(APIError(401, "a missing or wrong API key (send Authorization: Bearer KEY)",
                                               type_="authentication_error", code="invalid_api_key"))
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        m.labels(m.http_requests, route=route.path if route else "unmatched",
                 status=str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        if not state.engine.healthy:
            return error_response(APIError(503, "the engine has failed or stopped making progress", "service_unavailable"))
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if not state.ready or state.draining:
            return error_response(APIError(503, "draining" if state.draining else "loading", "service_unavailable"))
        return {"status": "ready"}

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "rung", "max_model_len": state.engine.max_model_len}]}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        state.check_model(body.model)
        if body.messages:
            tokens = state.chat_prompt(body.messages)
        elif body.prompt is not None:
            tokens = state.encode(body.prompt, body.add_special_tokens)
        else:
            raise APIError(400, "give a prompt or messages", param="prompt")
        return {"tokens": tokens, "count": len(tokens), "max_model_len": state.engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        state.check_model(body.model)
        if any(not 0 <= t < state.engine.vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {state.engine.vocab_size})", param="tokens")
        return {"prompt": tokenizer.decode(body.tokens)}

    def start(body: Sampling, prompts: list[list[int]], requested: int | None, logprobs: int | None):
        """Validate everything, then start n streams per prompt (nothing is queued if any part is invalid)."""
        state.check_model(body.model)
        plans = []
        for prompt in prompts:
            params = body.sampling_params(_max_tokens(state, prompt, requested), logprobs)
            state.engine.validate(prompt, params)
            plans.extend((prompt, seeded(params, i)) for i in range(body.n))
        state.check_capacity(len(plans), sum(len(prompt) for prompt, _ in plans))
        return [state.engine.generate(p, params, body.stop_strings(), body.priority) for p, params in plans]

    async def collect(request: Request, streams, choices: list[Choice]) -> None:
        """Run to completion unless the client goes away (then every stream is aborted)."""
        async def run():
            async for index, output in _merge(streams):
                choices[index].add(output)

        task = asyncio.create_task(run())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError
        task.result()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = _prompts(state, body)
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "the prompt is empty", param="prompt")
        streams = start(body, prompts, body.max_tokens, body.logprobs)
        choices = [Choice(len(prompts[i // body.n])) for i in range(len(streams))]
        echo = [tokenizer.decode(prompts[i // body.n]) if body.echo else "" for i in range(len(streams))]
        rid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": config.model_name}

        def usage() -> dict:
            return _usage(sum(len(p) for p in prompts) * body.n, sum(c.output_tokens for c in choices))

        if body.stream:
            async def events():
                echoed = set()
                async for index, output in _merge(streams):
                    choices[index].add(output)
                    text = output.text if index in echoed else echo[index] + output.text
                    echoed.add(index)
                    logprobs = (_completion_logprobs(state, [output], 0) if body.logprobs is not None else None)
                    yield _sse({**head, "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                                     "finish_reason": output.finish_reason}]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage()})
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        await collect(request, streams, choices)
        return {**head, "choices": [
            {"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason,
             "logprobs": _completion_logprobs(state, c.outputs, len(echo[i])) if body.logprobs is not None else None}
            for i, c in enumerate(choices)], "usage": usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prompt = state.chat_prompt(body.messages)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        streams = start(body, [prompt], body.max_completion_tokens or body.max_tokens, logprobs)
        choices = [Choice(len(prompt)) for _ in streams]
        rid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def head(kind: str) -> dict:
            return {"id": rid, "object": kind, "created": created, "model": config.model_name}

        def usage() -> dict:
            return _usage(len(prompt) * body.n, sum(c.output_tokens for c in choices))

        if body.stream:
            async def events():
                for index in range(len(streams)):  # the first delta of each choice carries the role
                    yield _sse({**head("chat.completion.chunk"), "choices": [
                        {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
                async for index, output in _merge(streams):
                    choices[index].add(output)
                    yield _sse({**head("chat.completion.chunk"), "choices": [
                        {"index": index, "delta": {"content": output.text} if output.text else {},
                         "logprobs": _chat_logprobs(state, [output]) if logprobs is not None else None,
                         "finish_reason": output.finish_reason}]})
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head("chat.completion.chunk"), "choices": [], "usage": usage()})
                yield _sse("[DONE]")

            return StreamingResponse(events(), media_type="text/event-stream")
        await collect(request, streams, choices)
        return {**head("chat.completion"), "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "logprobs": _chat_logprobs(state, c.outputs) if logprobs is not None else None,
             "finish_reason": c.finish_reason} for i, c in enumerate(choices)], "usage": usage()}

    return app
