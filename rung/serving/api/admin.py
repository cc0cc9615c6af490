"""The operator's routes: liveness (/health), readiness (/ready), /version, Prometheus /metrics and /v1/models."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rung import __version__
from rung.serving.api.errors import APIError, error_response
from rung.serving.api.response_bodies import ModelCard, ModelList, Status, Version, body
from rung.serving.api.state import ServerState

router = APIRouter()


@router.get("/health", response_model=Status)
async def health(raw: Request):
    if not raw.app.state.rung.engine.healthy:
        return error_response(APIError(503, "the engine has failed or stopped making progress", "service_unavailable"))
    return JSONResponse(body(Status(status="ok")))


@router.get("/ready", response_model=Status)
async def ready(raw: Request):
    state: ServerState = raw.app.state.rung
    if not state.ready or state.draining or not state.engine.healthy:
        reason = "draining" if state.draining else "loading" if not state.ready else "the engine has failed"
        return error_response(APIError(503, reason, "service_unavailable"))
    return JSONResponse(body(Status(status="ready")))


@router.get("/version", response_model=Version)
async def version():
    return JSONResponse(body(Version(version=__version__)))


@router.get("/metrics")
async def metrics(raw: Request):
    return Response(generate_latest(raw.app.state.rung.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.config.model_name, object="model", created=0, owned_by="rung",
                     max_model_len=state.engine.max_model_len, quantization=state.quantization)


@router.get("/v1/models", response_model=ModelList)
async def models(raw: Request):
    return JSONResponse(body(ModelList(object="list", data=[_card(raw.app.state.rung)])))


@router.get("/v1/models/{model:path}", response_model=ModelCard)
async def model(model: str, raw: Request):
    """One model (the SDK's `models.retrieve`); any other id is a 404 naming the one served."""
    state: ServerState = raw.app.state.rung
    state.check_model(model)
    return JSONResponse(body(_card(state)))
