"""Running a request's streams to the client: several streams merged as their outputs come, run to completion
unless the client goes away (then every stream is aborted, freeing its blocks), and Server-Sent Events framing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import Request
from pydantic import BaseModel

from rung.serving.engine.client import Output, RequestStream

DISCONNECT_POLL_SECONDS = 0.5


class Choice:
    """One choice's accumulated text, tokens and outputs."""

    def __init__(self, prompt_tokens: int):
        self.text, self.finish_reason, self.prompt_tokens = "", None, prompt_tokens
        self.output_tokens = 0
        self.outputs: list[Output] = []

    def add(self, output: Output) -> None:
        self.text += output.text
        self.finish_reason = output.finish_reason or self.finish_reason
        self.output_tokens = output.num_output_tokens
        self.outputs.append(output)


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Output]]:
    """Outputs of several requests as they come, tagged with the index of their stream. However it ends (the
    client went away, an error), every request still running is aborted."""
    queue: asyncio.Queue = asyncio.Queue()

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
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def collect(request: Request, streams: list[RequestStream], choices: list[Choice]) -> None:
    """Run every stream to completion into its choice, unless the client goes away (then all are aborted)."""
    async def run() -> None:
        async for index, output in merge(streams):
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
