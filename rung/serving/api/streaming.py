"""Running a request's streams to the client: several streams merged as their outputs come, run to completion
unless the client goes away (then every stream is aborted, freeing its blocks) or the server cuts them off (a
drain's grace period is over, the engine died), and Server-Sent Events framing — where a failure after the stream
began is one error event and `[DONE]`, so a client always learns how its stream ended."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from rung.serving.api.response_bodies import ErrorInfo, ErrorResponse
from rung.serving.engine.client import EngineFailure, Output, RequestStream

DISCONNECT_POLL_SECONDS = 0.5
log = logging.getLogger("rung.serve")


class OpenRequests:
    """The merges running now, so that the end of a drain ends them all at once, on any backend."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue] = set()

    def __len__(self) -> int:
        return len(self._queues)

    def cut_off(self, reason: str) -> None:
        for queue in self._queues:
            queue.put_nowait((-1, EngineFailure(reason)))


class Choice:
    """One choice's accumulated text, tokens and outputs."""

    def __init__(self):
        self.text, self.finish_reason, self.output_tokens = "", None, 0
        self.outputs: list[Output] = []

    def add(self, output: Output) -> None:
        self.text += output.text
        self.finish_reason = output.finish_reason or self.finish_reason
        self.output_tokens = output.num_output_tokens
        self.outputs.append(output)


async def merge(streams: list[RequestStream], open_requests: OpenRequests) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several requests as they come, tagged with the index of their stream. However it ends (the
    client went away, an error, a cut-off), every request still running is aborted."""
    queue: asyncio.Queue = asyncio.Queue()
    open_requests._queues.add(queue)

    async def pump(index: int, stream: RequestStream) -> None:
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
        open_requests._queues.discard(queue)
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def collect(request: Request, streams: list[RequestStream], choices: list[Choice],
                  open_requests: OpenRequests) -> None:
    """Run every stream to completion into its choice, unless the client goes away (then all are aborted)."""
    async def run() -> None:
        async for index, output in merge(streams, open_requests):
            choices[index].add(output)

    task = asyncio.create_task(run())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            raise asyncio.CancelledError
    task.result()


def sse(payload: BaseModel | str) -> str:
    """One Server-Sent Event: a response model (its set fields, see protocol.py) or a literal like [DONE]."""
    data = payload if isinstance(payload, str) else payload.model_dump_json(exclude_unset=True)
    return f"data: {data}\n\n"


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    """The SSE response: `events`, and if they fail after the 200 went out, an error event in OpenAI's envelope
    (which the SDKs raise as an APIError) and `[DONE]`."""
    async def guarded() -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        except EngineFailure as err:
            yield sse(ErrorResponse(error=ErrorInfo(message=str(err), type="service_unavailable")))
            yield sse("[DONE]")
        except Exception:  # noqa: BLE001 — a bug: the client still learns the stream failed, the log says why
            log.exception("a stream failed")
            yield sse(ErrorResponse(error=ErrorInfo(message="internal error; the server log has the details",
                                                    type="internal_error")))
            yield sse("[DONE]")

    return StreamingResponse(guarded(), media_type="text/event-stream")
