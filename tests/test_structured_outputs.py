"""Structured outputs, tool calls and the Responses API through the official `openai` SDK against a real `rung serve` (async scheduling
on, so every mask is filled with a step in flight): the model is the barely trained tiny one, so what makes the
output parse is the token mask, not the model."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import openai
import pytest
from conftest import Server, http

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 10}, "age": {"type": "integer", "minimum": 0,
                                                                             "maximum": 120},
                         "pets": {"type": "array", "maxItems": 2, "items": {"enum": ["cat", "dog", "newt"]}}}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """The tiny model with a 1,024-token window (its config's positions raised: rotary embeddings compute any
    position, and the model is near random anyway), so a system prompt listing tools fits."""
    wide = tmp_path_factory.mktemp("wide-tiny") / "tiny"
    shutil.copytree(model_dir, wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1024}))
    server = Server(wide, tmp_path_factory.mktemp("log") / "serve.log", "--async-scheduling")
    yield server
    server.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("max_tokens", [16, 100])
def test_json_object_mode_parses_where_free_text_does_not(client, max_tokens):
    free = client.chat.completions.create(model="tiny", messages=ASK, n=32, temperature=1.0, seed=0,
                                          max_tokens=max_tokens)
    assert not any(_parses(choice.message.content) for choice in free.choices)
    masked = client.chat.completions.create(model="tiny", messages=ASK, n=32, temperature=1.0, seed=0,
                                            max_tokens=max_tokens, response_format={"type": "json_object"})
    for choice in masked.choices:  # every one ends as an object within its budget, however short
        assert choice.finish_reason == "stop" and isinstance(json.loads(choice.message.content), dict), choice
    assert len({choice.message.content for choice in masked.choices}) > 8  # sampled, not one forced answer


def test_the_shortest_json_ending_completes_every_prefix():
    from rung.serving.core.json_closing import closing

    document = json.dumps({"name": "Ada \"L\" \u00e9\\", "age": -36.5e-1, "ok": True, "pets": [None, False, {}],
                           "": [[1, 2], {"k": "v"}]}, separators=(",", ":"))
    for cut in range(len(document) + 1):
        prefix = document[:cut]
        assert isinstance(json.loads(prefix + closing(prefix)), dict), prefix
    assert closing("") == "{}" and closing('{"a":[1,') == "null]}" and closing('{"k') == '":null}'


def test_json_schema_outputs_validate_and_streaming_gives_the_same_text(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    whole = client.chat.completions.create(model="tiny", messages=ASK, n=16, temperature=1.0, seed=1,
                                           max_tokens=100, response_format=fmt)
    for choice in whole.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    stream = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=1, max_tokens=100,
                                            response_format=fmt, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == whole.choices[0].message.content


def test_regex_and_choice_outputs_match_on_both_endpoints(client):
    pattern = r"[a-z]{3,8}-[0-9]{2}"
    for extra in ({"guided_regex": pattern}, {"structured_outputs": {"regex": pattern}}):
        out = client.completions.create(model="tiny", prompt="code:", n=8, temperature=1.0, seed=2, max_tokens=20,
                                        extra_body=extra)
        assert all(re.fullmatch(pattern, c.text) for c in out.choices), [c.text for c in out.choices]
    choices = ["yes", "no", "it depends"]
    out = client.chat.completions.create(model="tiny", messages=ASK, n=8, temperature=1.0, seed=3, max_tokens=20,
                                         extra_body={"guided_choice": choices})
    assert {c.message.content for c in out.choices} <= set(choices)
    greedy = client.completions.create(model="tiny", prompt="answer:", temperature=0, max_tokens=20,
                                       extra_body={"structured_outputs": {"choice": choices}})
    assert greedy.choices[0].text in choices
    lark = client.completions.create(model="tiny", prompt="x", temperature=1.0, seed=4, max_tokens=30,
                                     extra_body={"guided_grammar": 'start: "(" NUMBER ("," NUMBER)* ")"\n'
                                                                   "NUMBER: /[0-9]{1,3}/"})
    assert re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", lark.choices[0].text), lark.choices[0].text


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
])
def test_a_constraint_the_engine_cannot_follow_is_a_400_naming_its_field(server, extra, param):
    status, _headers, body = http("POST", f"{server.url}/v1/chat/completions",
                                  {"model": "tiny", "messages": ASK, "max_tokens": 5, **extra})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == param and error["type"] == "invalid_request_error", error


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False, "required": ["zone"],
                                       "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}}}}}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}


def assert_valid_calls(message, names: set[str]) -> None:
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_tool_choices_always_yield_valid_calls(client):
    required = client.chat.completions.create(model="tiny", messages=ASK, n=8, temperature=1.0, seed=5,
                                              max_tokens=100, tools=[WEATHER, TIME], tool_choice="required")
    for choice in required.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert_valid_calls(choice.message, {"get_weather", "get_time"})
    named = client.chat.completions.create(model="tiny", messages=ASK, n=8, temperature=1.0, seed=6, max_tokens=100,
                                           tools=[WEATHER, TIME], parallel_tool_calls=False,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    for choice in named.choices:
        assert len(choice.message.tool_calls) == 1 and choice.finish_reason == "tool_calls"
        assert_valid_calls(choice.message, {"get_time"})
    # streamed: the calls arrive as delta.tool_calls and add up to the same call
    stream = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=6, max_tokens=100,
                                            tools=[WEATHER, TIME], parallel_tool_calls=False, stream=True,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    deltas, finish = [], None
    for chunk in stream:
        deltas += chunk.choices[0].delta.tool_calls or []
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and [d.function.name for d in deltas] == ["get_time"]
    assert deltas[0].function.arguments == named.choices[0].message.tool_calls[0].function.arguments


def test_auto_reads_a_call_written_in_the_templates_format_and_a_tool_conversation_round_trips(client):
    call = r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[a-z]{2,8}", "unit": "celsius"\}\}\n</tool_call>'
    auto = client.chat.completions.create(model="tiny", messages=ASK, temperature=1.0, seed=7, max_tokens=60,
                                          tools=[WEATHER], extra_body={"guided_regex": call})  # the model "writes" it
    message = auto.choices[0].message
    assert auto.choices[0].finish_reason == "tool_calls" and message.content is None
    assert_valid_calls(message, {"get_weather"})
    plain = client.chat.completions.create(model="tiny", messages=ASK, temperature=0, max_tokens=8, tools=[WEATHER],
                                           tool_choice="none")
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].finish_reason != "tool_calls"
    conversation = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
                        {"id": message.tool_calls[0].id, "type": "function",
                         "function": {"name": "get_weather", "arguments": message.tool_calls[0].function.arguments}}]},
                    {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "18 degrees, sunny"}]
    answer = client.chat.completions.create(model="tiny", messages=conversation, temperature=0, max_tokens=8,
                                            tools=[WEATHER])
    assert answer.choices[0].message.role == "assistant" and answer.usage.prompt_tokens > 60


def test_the_hermes_reader_finds_calls_however_the_text_is_split():
    from rung.serving.api.tool_calls import HermesFormat

    fmt = HermesFormat()
    text = ('Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 2}}\n</tool_call>\n'
            '<tool_call>\n{not json}\n</tool_call> <tool_')
    content, calls = fmt.parse(text)
    assert [c.name for c in calls] == ["get_time"] and json.loads(calls[0].arguments) == {"zone": 2}
    assert content == "Checking.\n\n<tool_call>\n{not json}\n</tool_call> <tool_"  # a block that is no call stays
    for size in (1, 2, 5, 13):
        reader, pieces, found = fmt.reader(), [], []
        for at in range(0, len(text), size):
            piece, calls = reader.feed(text[at:at + size])
            pieces.append(piece)
            found += calls
        pieces.append(reader.finish())
        assert "".join(pieces).strip() == content and [c.name for c in found] == ["get_time"], size


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools.0.function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "18 degrees"}]}, "messages.0"),
])
def test_bad_tools_are_a_400_naming_the_field(server, extra, param):
    status, _headers, body = http("POST", f"{server.url}/v1/chat/completions",
                                  {"model": "tiny", "messages": ASK, "max_tokens": 5, **extra})
    error = json.loads(body)["error"]
    assert status == 400 and error["param"] == param, error


WEATHER_FLAT = {"type": "function", **WEATHER["function"]}  # the Responses API's tool shape


def test_the_responses_api_answers_as_chat_does_whole_and_streamed(client):
    ask = {"model": "tiny", "instructions": "Be brief.", "max_output_tokens": 12, "temperature": 0}
    response = client.responses.create(input="Describe a person.", **ask)
    chat = client.chat.completions.create(model="tiny", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe a person."}])
    assert response.output_text == chat.choices[0].message.content and response.output_text
    assert response.object == "response" and response.status in ("completed", "incomplete")
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.usage.output_tokens > 0
    events = list(client.responses.create(input=[{"role": "user", "content": "Describe a person."}], stream=True,
                                          **ask))
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                    "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas == response.output_text == events[-1].response.output_text


def test_the_responses_api_calls_functions_takes_their_outputs_and_formats_json(client):
    called = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER_FLAT],
                                     tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                     max_output_tokens=100, extra_body={"seed": 8})
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), SCHEMAS["get_weather"])
    follow_up = client.responses.create(model="tiny", tools=[WEATHER_FLAT], max_output_tokens=8, temperature=0,
                                        input=[{"role": "user", "content": "Weather in Paris?"},
                                               {"type": "function_call", "call_id": call.call_id,
                                                "name": call.name, "arguments": call.arguments},
                                               {"type": "function_call_output", "call_id": call.call_id,
                                                "output": "18 degrees"}])
    assert follow_up.usage.input_tokens > called.usage.input_tokens
    shaped = client.responses.create(model="tiny", input="A person:", temperature=1.0, max_output_tokens=100,
                                     text={"format": {"type": "json_schema", "name": "person", "schema": PERSON}})
    jsonschema.validate(json.loads(shaped.output_text), PERSON)


@pytest.mark.parametrize("extra, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"tools": [WEATHER_FLAT], "tool_choice": {"type": "function", "name": "get_time"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objectx"}}}}, "text.format"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, None),
])
def test_the_responses_api_refuses_what_it_cannot_do_with_a_400(server, extra, param):
    status, _headers, body = http("POST", f"{server.url}/v1/responses",
                                  {"model": "tiny", "input": "hi", "max_output_tokens": 5, **extra})
    error = json.loads(body)["error"]
    assert status == 400 and (param is None or error["param"] == param), error


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
