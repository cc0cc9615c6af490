"""The OpenAI API's request bodies as pydantic models (their JSON schemas are what /openapi.json shows; the
responses are in `response_bodies.py`). Requests are checked as strictly as OpenAI's schema reads: no "5" for an integer,
no `true` for a number, no Infinity, no string that is not valid Unicode (a lone UTF-16 surrogate), no empty stop
string. Unknown request fields are ignored, as OpenAI-compatible servers do, so newer SDKs keep working."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from rung.serving.core.params import SamplingError, SamplingParams
from rung.serving.core.structured import StructuredOutput, problem

MAX_N = 128


def _encodable(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError as err:
        raise ValueError(f"has a lone UTF-16 surrogate at character {err.start}; send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_encodable)]
TokenId = Annotated[int, Field(ge=0)]


class RequestBody(BaseModel):
    """A request body or a part of one: strict types, finite numbers, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(RequestBody):
    include_usage: bool = False


class JsonSchemaFormat(RequestBody):
    model_config = ConfigDict(populate_by_name=True)
    name: Text
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")  # `schema` would shadow BaseModel's
    strict: bool | None = None  # rung always enforces the schema through the token mask


class ResponseFormat(RequestBody):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema object")
        return self


class StructuredOutputs(RequestBody):
    """vLLM's `structured_outputs` extra: one of these constraints."""

    json_: dict[str, Any] | Text | None = Field(None, alias="json")
    regex: Text | None = None
    choice: list[Text] | None = None
    grammar: Text | None = None
    json_object: bool | None = None


class Sampling(RequestBody):
    """Fields shared by completions and chat completions."""

    model: Text
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    user: Text | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None  # token id (as JSON keys are strings) -> bias in [-100, 100]
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not (key.isascii() and key.isdigit()):  # "²".isdigit() holds, yet int() refuses it
                raise ValueError(f"keys must be token ids (non-negative integers), got {key[:40]!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"biases must be in [-100, 100], got {value} for token {key}")
        return bias

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if stop == "" or isinstance(stop, list) and "" in stop:
            raise ValueError("an empty stop string would stop before the first token")
        return stop

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def structured_output(self, tool_calls: StructuredOutput | None = None) -> StructuredOutput | None:
        """The one constraint the request sets (`tool_calls`: the grammar of a required or named tool call),
        checked: SamplingError naming the field if it is not one the engine can follow, or if several fields set
        one."""
        given = [(field, constraint) for field, constraint in [("tool_choice", tool_calls), *self._constraints()]
                 if constraint is not None]
        if len(given) > 1:
            raise SamplingError(given[1][0], f"conflicts with {given[0][0]}: give one structured-output constraint")
        if not given:
            return None
        field, constraint = given[0]
        if (reason := problem(constraint)) is not None:
            raise SamplingError(field, reason)
        return constraint

    def _constraints(self) -> list[tuple[str, StructuredOutput | None]]:
        fmt, extra = self.response_format, self.structured_outputs or StructuredOutputs()
        return [
            ("response_format", None if fmt is None or fmt.type == "text" else
             StructuredOutput("json_object") if fmt.type == "json_object" else
             StructuredOutput("json_schema", json.dumps(fmt.json_schema.schema_))),
            ("structured_outputs.json", _json_constraint(extra.json_)),
            ("structured_outputs.regex", _maybe("regex", extra.regex)),
            ("structured_outputs.choice", _maybe("choice", _choices(extra.choice))),
            ("structured_outputs.grammar", _maybe("grammar", extra.grammar)),
            ("structured_outputs.json_object", StructuredOutput("json_object") if extra.json_object else None),
            ("guided_json", _json_constraint(self.guided_json)),
            ("guided_regex", _maybe("regex", self.guided_regex)),
            ("guided_choice", _maybe("choice", _choices(self.guided_choice))),
            ("guided_grammar", _maybe("grammar", self.guided_grammar)),
        ]

    def sampling_params(self, max_tokens: int, logprobs: int | None,
                        tool_calls: StructuredOutput | None = None) -> SamplingParams:
        """Raises SamplingError naming the offending field."""
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise SamplingError("seed", f"must be in [0, 2^63), got {self.seed}")
        structured = self.structured_output(tool_calls)
        return SamplingParams(max_tokens=max_tokens, min_tokens=self.min_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              repetition_penalty=self.repetition_penalty, stop_token_ids=tuple(self.stop_token_ids),
                              ignore_eos=self.ignore_eos, logprobs=logprobs,
                              skip_special_tokens=self.skip_special_tokens,
                              spaces_between_special_tokens=self.spaces_between_special_tokens,
                              logit_bias=tuple((int(t), bias) for t, bias in (self.logit_bias or {}).items()),
                              structured=structured)


def _maybe(kind: str, spec: str | None) -> StructuredOutput | None:
    return None if spec is None else StructuredOutput(kind, spec)


def _choices(choices: list[str] | None) -> str | None:
    """Choices as a constraint's spec: their JSON list."""
    return None if choices is None else json.dumps(choices)


def _json_constraint(schema: dict[str, Any] | str | None) -> StructuredOutput | None:
    """vLLM takes a schema as an object or as its JSON text."""
    if schema is None:
        return None
    return StructuredOutput("json_schema", schema if isinstance(schema, str) else json.dumps(schema))


class CompletionRequest(Sampling):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    # Accepted only where they change nothing, so a client never gets an answer that silently ignored them: rung
    # draws no extra candidates server-side (best_of > n) and its models are not trained for insertion (suffix).
    best_of: int | None = None
    suffix: Text | None = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("insertion (a non-empty suffix) is not supported: rung's models are not trained for it")
        return suffix

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(f"{best_of} (other than n, {n}) is not supported: rung returns every sample it draws; "
                             "ask for n samples and choose among them")
        return best_of


class TextPart(RequestBody):
    """A content part; rung's models read text only, so any other part is refused rather than dropped."""

    type: Literal["text"]
    text: Text


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class FunctionCallIn(RequestBody):
    name: FunctionName
    arguments: Text  # JSON text


class ToolCallIn(RequestBody):
    """A call an assistant message made earlier in the conversation."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(RequestBody):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant: the calls it made
    tool_call_id: Text | None = None  # tool: the call this message answers

    @model_validator(mode="after")
    def _has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: a call's arguments as an object where they are JSON."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message


class FunctionDefinition(RequestBody):
    name: FunctionName
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema for the arguments
    strict: bool | None = None  # with tool_choice required or named, rung always enforces the schema

    @field_validator("parameters")
    @classmethod
    def _a_schema(cls, parameters: dict[str, Any] | None) -> dict[str, Any] | None:
        from jsonschema import Draft202012Validator, SchemaError

        try:
            Draft202012Validator.check_schema(parameters or {})
        except SchemaError as err:
            raise ValueError(f"not a valid JSON schema: {err.message}") from None
        return parameters


class Tool(RequestBody):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestBody):
    name: Text


class NamedToolChoice(RequestBody):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tools")
    @classmethod
    def _distinct_names(cls, tools: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in tools or []]
        if len(set(names)) != len(names):
            raise ValueError("two functions share a name")
        return tools

    @field_validator("tool_choice")
    @classmethod
    def _names_a_tool(cls, choice, info: ValidationInfo):
        names = [tool.function.name for tool in info.data.get("tools") or []]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"names {choice.function.name!r}, which is not among the tools "
                             f"({', '.join(names) or 'none given'})")
        if choice == "required" and not names:
            raise ValueError("'required' needs tools")
        return choice

    def functions(self) -> list[dict[str, Any]]:
        """The functions the model is offered (none when tool_choice is 'none'), as OpenAI function objects."""
        if not self.tools or self.tool_choice == "none":
            return []
        return [tool.function.model_dump(exclude_none=True) for tool in self.tools]

    def forced_functions(self) -> list[dict[str, Any]]:
        """The functions the output must call (tool_choice 'required' or named); empty when the model chooses."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return [f for f in self.functions() if f["name"] == self.tool_choice.function.name]
        return self.functions() if self.tool_choice == "required" else []


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class TokenizeRequest(RequestBody):
    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(RequestBody):
    model: Text | None = None
    tokens: list[int]
