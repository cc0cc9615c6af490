"""The ASGI middleware every HTTP request passes first: the API key, the body limit, the per-route count, and the
last line of defence that turns any exception into OpenAI's error envelope.

A plain ASGI middleware rather than `@app.middleware("http")`: it sees the body as it arrives, so a chunked upload
is stopped at the limit instead of after it has been read whole; it leaves `receive` to the route, so a handler
still sees the client disconnect; and it costs no extra task per request.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import ClientDisconnect

from rung.serving.api.errors import APIError, error_response
from rung.serving.config import ServeConfig
from rung.serving.metrics import ServeMetrics

Message = MutableMapping[str, Any]
ASGIApp = Callable[[Message, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})  # what an orchestrator probes: no API key needed
DISCARD_LIMIT = 64 << 20  # an authenticated oversized body up to this size is read and dropped before the 413
CLIENT_GONE = "499"  # the status counted for a client that went away before its response (nginx's convention)
log = logging.getLogger("rung.serve")


class BodyTooLarge(Exception):
    """The body grew past the limit while it was being read."""


def authorized(header: bytes, api_key: str) -> bool:
    """`Authorization: Bearer KEY`, the scheme in any case (RFC 9110), the key compared as bytes in constant time
    (a non-ASCII key is just other bytes, never an error)."""
    scheme, _, token = header.partition(b" ")
    return scheme.lower() == b"bearer" and secrets.compare_digest(token.strip(), api_key.encode())


class Guard:
    def __init__(self, app: ASGIApp, config: ServeConfig, metrics: ServeMetrics):
        self.app, self.config, self.metrics = app, config, metrics

    async def __call__(self, scope: Message, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = CLIENT_GONE
        started = False

        async def send_counted(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = str(message["status"]), True
            await send(message)

        async def reply(err: APIError) -> None:
            await error_response(err)(scope, receive, send_counted)

        try:
            refusal = await self.refusal(scope, receive)
            if refusal is not None:
                await reply(refusal)
            else:
                body = LimitedBody(receive, self.config.max_body_bytes)

                async def send_unless_too_large(message: Message) -> None:
                    if body.exceeded:  # FastAPI turned the read error into a 400 of its own: the client is owed a 413
                        raise BodyTooLarge
                    await send_counted(message)

                await self.app(scope, body, send_unless_too_large)
        except BodyTooLarge:
            if not started:
                await reply(self.too_large())
        except ClientDisconnect:
            pass  # the client went away mid-upload: nothing to answer, nothing to log
        except Exception:  # noqa: BLE001 — a bug: the client still gets the envelope, the log the traceback
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await reply(APIError(500, "internal error; the server log has the details", type_="internal_error"))
        finally:
            route = scope.get("route")
            self.metrics.labels(self.metrics.http_requests, route=route.path if route else "unmatched",
                                status=status).inc()

    async def refusal(self, scope: Message, receive) -> APIError | None:
        """Refuse before the route runs: a missing or wrong key first (an unknown client learns nothing about the
        limits), then a declared Content-Length over the limit."""
        headers = dict(scope["headers"])
        try:
            length = int(headers.get(b"content-length", b"0"))
        except ValueError:
            length = 0  # not a number: the body is then read and bounded as it comes
        key = self.config.api_key
        if key and scope["path"] not in OPEN_PATHS and not authorized(headers.get(b"authorization", b""), key):
            await self.discard(receive, length, self.config.max_body_bytes)
            return APIError(401, "a missing or wrong API key (send Authorization: Bearer KEY)",
                            type_="authentication_error", code="invalid_api_key")
        if length > self.config.max_body_bytes:
            await self.discard(receive, length, DISCARD_LIMIT)
            return self.too_large(length)
        return None

    @staticmethod
    async def discard(receive, length: int, limit: int) -> None:
        """Read a refused body away (up to `limit` bytes declared), so that a client still sending sees the
        answer rather than a connection reset."""
        if 0 < length <= limit:
            while (await receive()).get("more_body"):
                pass

    def too_large(self, length: int | None = None) -> APIError:
        size = f"{length} bytes" if length is not None else "more bytes than that"
        return APIError(413, f"the body is {size}; the limit is {self.config.max_body_bytes} bytes",
                        code="request_too_large")


class LimitedBody:
    """One request's `receive`, counting the body as it comes and stopping it at the limit, whatever
    Content-Length said."""

    def __init__(self, receive, limit: int):
        self.receive, self.limit = receive, limit
        self.received, self.exceeded = 0, False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.exceeded = True
                raise BodyTooLarge
        return message
