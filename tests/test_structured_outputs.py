"""Structured outputs through the official `openai` SDK against a real `rung serve` (async scheduling on, so every
mask is filled with a step in flight): the model is the barely trained tiny one, so what makes the output parse is
the token mask, not the model."""

from __future__ import annotations

import json
import re

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
    server = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--async-scheduling")
    yield server
    server.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


def test_json_object_mode_parses_where_free_text_does_not(client):
    free = client.chat.completions.create(model="tiny", messages=ASK, n=32, temperature=1.0, seed=0, max_tokens=80)
    assert not any(_parses(choice.message.content) for choice in free.choices)
    masked = client.chat.completions.create(model="tiny", messages=ASK, n=32, temperature=1.0, seed=0,
                                            max_tokens=100, response_format={"type": "json_object"})
    stopped = [c for c in masked.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 16, [c.finish_reason for c in masked.choices]
    for choice in stopped:
        assert isinstance(json.loads(choice.message.content), dict), choice.message.content
    for choice in masked.choices:  # cut by max_tokens: still a JSON object's beginning, with no free text
        assert choice.message.content.startswith("{"), choice.message.content


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


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
