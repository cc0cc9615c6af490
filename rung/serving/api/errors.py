"""Every way a request can fail, answered in OpenAI's error envelope with the right status — never a 500: 400
validation (with `param`), 401 API key, 404 model or route, 413 body size, 429 queue full (with Retry-After), 503
not ready, draining or engine failure. One mapping from exception to response, installed on the app."""

from __future__ import annotations

import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rung.serving.api.response_bodies import ErrorInfo, ErrorResponse, body
from rung.serving.core.params import SamplingError
from rung.serving.engine.client import EngineFailure


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_response(err: APIError) -> JSONResponse:
    info = ErrorInfo(message=err.message, type=err.type, param=err.param, code=err.code)
    return JSONResponse(body(ErrorResponse(error=info)), status_code=err.status, headers=err.headers)


def _is_union_tag(part: str | int) -> bool:
    """pydantic names the member of a union it tried (`prompt.list[int]`, `stop.function-after[...]`): the
    client's field is the path without them."""
    return isinstance(part, str) and not re.fullmatch(r"[a-z_][a-z0-9_]*", part) or part in ("str", "int", "float",
                                                                                              "bool", "list", "dict")


def most_specific(errors: list[dict]) -> dict:
    """The error to report when a union field failed every member: a value that broke a rule (a bound, a
    surrogate) over a value of the wrong type, and the deepest path over a shallow one — so `[1, -3]` for a prompt
    names `prompt.1` (must be >= 0), not `prompt` (not a string)."""
    return max(errors, key=lambda e: (not e.get("type", "").endswith("_type"), len(e.get("loc", ()))))


def install_error_handlers(app: FastAPI) -> None:
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
        first = most_specific(err.errors())
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _is_union_tag(p)]
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
