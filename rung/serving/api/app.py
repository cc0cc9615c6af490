"""The OpenAI-compatible HTTP app (`rung serve`): the app factory — state, lifespan, the guard middleware
(`guard.py`: API key, body size, per-route counts, the last-resort error envelope), the error mapping (`errors.py`)
and one router per API family:

    completions.py  /v1/completions            chat.py   /v1/chat/completions
    tokenize.py     /tokenize, /detokenize     admin.py  /health, /ready, /version, /metrics, /v1/models

Routes see only an EngineClient (`engine/client.py`): rung's AsyncEngine or the vLLM backend.
"""

from __future__ import annotations

from fastapi import FastAPI

from rung import __version__
from rung.serving.api import admin, chat, completions, responses, tokenize
from rung.serving.api.errors import install_error_handlers
from rung.serving.api.guard import Guard
from rung.serving.api.state import ServerState, load_tokenizer
from rung.serving.config import ServeConfig
from rung.serving.engine.client import EngineClient
from rung.serving.engine.engine import Engine
from rung.serving.metrics import ServeMetrics


def engine_client(config: ServeConfig, tokenizer, metrics: ServeMetrics, engine: Engine | None) -> EngineClient:
    """The engine `config.backend` names: vLLM's, or rung's in a process of its own (on a thread of this process
    when the caller built the Engine)."""
    if config.backend == "vllm":
        from rung.serving.backends.vllm import VLLMAsyncEngine

        return VLLMAsyncEngine(config.model_dir, config.engine, metrics)
    from rung.serving.engine.async_engine import AsyncEngine
    from rung.serving.engine.core import ProcessCore

    return AsyncEngine(engine or ProcessCore(config.model_dir, config.engine), tokenizer, metrics)


def served_quantization(config: ServeConfig) -> str:
    """The engine's `--quantization`, else what the folder holds (`rung quantize` writes mixed ones)."""
    if config.engine.quantization != "none":
        return config.engine.quantization
    from rung.serving.worker.compressed_tensors import describe

    return describe(config.model_dir)


def create_app(config: ServeConfig, engine: Engine | EngineClient | None = None, tokenizer=None) -> FastAPI:
    """The app. `engine`: an Engine to step on a thread here, or a ready EngineClient; by default the engine (and
    the tokenizer) load from `config.model_dir`."""
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model_dir)
    metrics = ServeMetrics(config.model_name)
    metrics.labels(metrics.queue_limit).set(config.max_queued_requests)
    quantization = served_quantization(config)
    metrics.describe_model(config.engine.dtype, quantization)
    client = engine if engine is not None and not isinstance(engine, Engine) else \
        engine_client(config, tokenizer, metrics, engine)
    state = ServerState(config, tokenizer, client, metrics, quantization)

    async def lifespan(app: FastAPI):
        state.engine.start()
        state.ready = True
        yield
        state.ready = False
        state.engine.stop()

    app = FastAPI(title="rung", version=__version__, lifespan=lifespan)
    app.state.rung = state
    install_error_handlers(app)

    app.add_middleware(Guard, config=config, metrics=metrics)
    for module in (admin, completions, chat, responses, tokenize):
        app.include_router(module.router)
    return app
