"""POST /v1/responses: OpenAI's Responses API on the chat path (the request becomes a chat request, see
`responses_protocol.py`), its reply as output items — a message with `output_text`, a `function_call` per tool call —
whole or as the API's typed stream of events (`response.created` … `response.output_text.delta` …
`response.completed`). Stateless: nothing is stored, so `previous_response_id` is refused and a conversation is sent
whole, as `input` items."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from rung.serving.api.chat import start_chat
from rung.serving.api.errors import APIError, most_specific
from rung.serving.api.protocol import ChatCompletionRequest
from rung.serving.api.responses_protocol import ResponsesRequest
from rung.serving.api.state import ServerState
from rung.serving.api.streaming import Choice, collect, event_stream, merge
from rung.serving.api.tool_calls import ToolCall
from rung.serving.core.params import SamplingError

router = APIRouter()
# chat request fields as the Responses API names them, for errors
FIELDS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


def responses_field(chat_field: str) -> str:
    head, _, rest = chat_field.partition(".")
    if head == "tools":
        return chat_field.replace(".function.", ".", 1)
    return FIELDS.get(head, head) + ("." + rest if rest and head not in FIELDS else "")


@router.post("/v1/responses")
async def create_response(request: ResponsesRequest, raw: Request):
    state: ServerState = raw.app.state.rung
    try:
        chat = ChatCompletionRequest.model_validate(request.chat_body())
        run = await start_chat(state, chat)
    except ValidationError as err:
        first = most_specific(err.errors())
        field = responses_field(".".join(str(p) for p in first.get("loc", ())))
        raise APIError(400, f"{field}: {first.get('msg', 'invalid')}"[:500], param=field) from None
    except SamplingError as err:
        raise APIError(400, str(err), param=responses_field(err.field)) from None
    envelope = {"id": f"resp_{secrets.token_hex(12)}", "object": "response", "created_at": int(time.time()),
                "model": state.config.model_name, "instructions": request.instructions,
                "max_output_tokens": request.max_output_tokens, "temperature": request.temperature,
                "top_p": request.top_p, "parallel_tool_calls": request.parallel_tool_calls,
                "tool_choice": _tool_choice(request),
                "tools": [tool.model_dump(exclude_none=True) for tool in request.tools or []],
                "text": {"format": request.text.format.model_dump(by_alias=True, exclude_none=True)}
                if request.text and request.text.format else {"format": {"type": "text"}},
                "metadata": request.metadata or {}, "error": None, "incomplete_details": None}
    prompt_tokens = len(run.prompt)
    fmt = run.tool_format

    def finished(choice: Choice, output: list[dict]) -> dict:
        cut = choice.finish_reason == "length"
        return {**envelope, "status": "incomplete" if cut else "completed", "output": output,
                "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
                "usage": {"input_tokens": prompt_tokens, "output_tokens": choice.output_tokens,
                          "total_tokens": prompt_tokens + choice.output_tokens,
                          "input_tokens_details": {"cached_tokens": 0},
                          "output_tokens_details": {"reasoning_tokens": 0}}}

    choice = Choice()
    if not request.stream:
        await collect(raw, run.streams, [choice], state.open_requests)
        content, calls = (choice.text, []) if fmt is None else fmt.parse(choice.text)
        status = "incomplete" if choice.finish_reason == "length" else "completed"
        output = ([_message(content, status)] if content else []) + [_call(call, "completed") for call in calls]
        return JSONResponse(finished(choice, output))

    async def events():
        stream = EventWriter()
        yield stream.event("response.created", response={**envelope, "status": "in_progress", "output": []})
        yield stream.event("response.in_progress", response={**envelope, "status": "in_progress", "output": []})
        reader = fmt.reader() if fmt else None
        async for _index, out in merge(run.streams, state.open_requests):
            choice.add(out)
            text, calls = (out.text, []) if reader is None else reader.feed(out.text)
            if reader is not None and out.finish_reason:
                text += reader.finish()
            for event in stream.text(text):
                yield event
            for call in calls:
                for event in stream.call(call):
                    yield event
        for event in stream.close_message():
            yield event
        done = finished(choice, stream.output)
        yield stream.event("response.completed" if done["status"] == "completed" else "response.incomplete",
                           response=done)

    return event_stream(events())


class EventWriter:
    """The Responses API's stream: every event numbered, the output items opened and closed around their
    deltas, and the finished items kept for the closing `response.completed`."""

    def __init__(self) -> None:
        self.sequence, self.output, self.message, self.text_so_far = 0, [], None, ""

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    def text(self, delta: str) -> list[str]:
        if not delta:
            return []
        events = []
        if self.message is None:
            self.message, self.text_so_far = _message("", "in_progress"), ""
            self.message["content"] = []
            events.append(self.event("response.output_item.added", output_index=len(self.output), item=self.message))
            events.append(self.event("response.content_part.added", output_index=len(self.output), content_index=0,
                                     item_id=self.message["id"], part=_text_part("")))
        self.text_so_far += delta
        events.append(self.event("response.output_text.delta", output_index=len(self.output), content_index=0,
                                 item_id=self.message["id"], delta=delta, logprobs=[]))
        return events

    def close_message(self) -> list[str]:
        if self.message is None:
            return []
        index, text = len(self.output), self.text_so_far
        item = {**self.message, "status": "completed", "content": [_text_part(text)]}
        events = [self.event("response.output_text.done", output_index=index, content_index=0,
                             item_id=item["id"], text=text, logprobs=[]),
                  self.event("response.content_part.done", output_index=index, content_index=0, item_id=item["id"],
                             part=_text_part(text)),
                  self.event("response.output_item.done", output_index=index, item=item)]
        self.output.append(item)
        self.message = None
        return events

    def call(self, call: ToolCall) -> list[str]:
        events = self.close_message()
        index, item = len(self.output), _call(call, "in_progress")
        events += [self.event("response.output_item.added", output_index=index, item={**item, "arguments": ""}),
                   self.event("response.function_call_arguments.delta", output_index=index, item_id=item["id"],
                              delta=call.arguments),
                   self.event("response.function_call_arguments.done", output_index=index, item_id=item["id"],
                              arguments=call.arguments)]
        item = {**item, "status": "completed"}
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return events


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


def _message(text: str, status: str) -> dict:
    return {"type": "message", "id": f"msg_{secrets.token_hex(12)}", "status": status, "role": "assistant",
            "content": [_text_part(text)]}


def _call(call: ToolCall, status: str) -> dict:
    return {"type": "function_call", "id": f"fc_{secrets.token_hex(12)}", "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


def _tool_choice(request: ResponsesRequest) -> Any:
    choice = request.tool_choice
    if choice is None:
        return "auto" if request.tools else "none"
    return choice if isinstance(choice, str) else choice.model_dump()
