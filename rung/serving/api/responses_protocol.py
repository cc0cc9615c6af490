"""The Responses API's request body (`POST /v1/responses`) as pydantic models. A request is
translated into a chat request — the same template, engine, structured outputs and tool calls — so the two
endpoints cannot drift apart: text input and output, function tools, `text.format` for JSON."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from rung.serving.api.protocol import FunctionName, RequestBody, Text


class InputText(RequestBody):
    type: Literal["input_text", "output_text"]  # earlier assistant turns are sent back as output_text
    text: Text


class MessageItem(RequestBody):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[InputText]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class FunctionCallItem(RequestBody):
    type: Literal["function_call"]
    call_id: Text
    name: FunctionName
    arguments: Text
    id: Text | None = None
    status: Text | None = None


class FunctionCallOutputItem(RequestBody):
    type: Literal["function_call_output"]
    call_id: Text
    output: Text


class FunctionTool(RequestBody):
    type: Literal["function"]
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(RequestBody):
    type: Literal["function"]
    name: Text


class TextFormat(RequestBody):
    model_config = ConfigDict(populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: Text | None = None
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class TextConfig(RequestBody):
    format: TextFormat | None = None


class ResponsesRequest(RequestBody):
    model: Text
    input: Text | list[MessageItem | FunctionCallItem | FunctionCallOutputItem]
    instructions: Text | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # vLLM's extra, for reproducible samples
    stream: bool = False
    text: TextConfig | None = None
    store: bool | None = None  # accepted; rung keeps no responses (GET /v1/responses/{id} is not served)
    metadata: dict[str, Text] | None = None
    user: Text | None = None
    previous_response_id: Text | None = None

    @field_validator("previous_response_id")
    @classmethod
    def _stateless(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("is not supported: rung keeps no responses; send the whole conversation as `input`")
        return value

    def chat_body(self) -> dict[str, Any]:
        """The equivalent chat completion request, as JSON data."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": self.instructions}] if self.instructions \
            else []
        items = [MessageItem(role="user", content=self.input)] if isinstance(self.input, str) else self.input
        for item in items:
            if isinstance(item, MessageItem):
                messages.append({"role": item.role, "content": item.text()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                if messages and messages[-1]["role"] == "assistant" and "tool_calls" in messages[-1]:
                    messages[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            else:
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature,
                                "top_p": self.top_p, "parallel_tool_calls": self.parallel_tool_calls}
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.seed is not None:
            body["seed"] = self.seed
        if self.tools:
            body["tools"] = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
                             for tool in self.tools]
        if isinstance(self.tool_choice, NamedFunctionChoice):
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice.name}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        fmt = self.text.format if self.text else None
        if fmt is not None and fmt.type != "text":
            body["response_format"] = {"type": fmt.type} if fmt.type == "json_object" else {
                "type": "json_schema", "json_schema": {"name": fmt.name or "output", "schema": fmt.schema_}}
        return body
