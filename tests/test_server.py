"""`rung serve` as a real process on 127.0.0.1, driven by the official `openai` client (sync and async), curl-like
raw HTTP for what the SDK cannot send, and promtool for the metrics exposition."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import threading
import time

import openai
import pytest
from conftest import Server, http, run_rung

KEY = "test-key"
LABEL = '{model_name="tiny"}'


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Async scheduling on (a GPU's default; a CPU's is off, which the servers the other tests start use): every
    test on this server, stop strings and disconnects included, runs with a step in flight."""
    server = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--api-key", KEY, "--async-scheduling")
    yield server
    server.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def test_models_completions_and_chat_through_the_sdk(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    completion = client.completions.create(model="tiny", prompt="def main(", max_tokens=12, temperature=0,
                                           logprobs=3, extra_body={"ignore_eos": True})
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert completion.usage.completion_tokens == 12 and completion.usage.prompt_tokens > 0
    assert len(choice.logprobs.tokens) == 12 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    assert all(len(top) == 3 for top in choice.logprobs.top_logprobs)
    assert "".join(choice.logprobs.tokens) == choice.text
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "Say hi"}],
                                          max_completion_tokens=8, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 8
    assert len(chat.choices[0].logprobs.content) == 8
    assert all(len(entry.top_logprobs) == 2 for entry in chat.choices[0].logprobs.content)


def test_greedy_http_output_equals_the_offline_engine(client, model_dir):
    from transformers import AutoTokenizer

    from rung.serving.core.params import SamplingParams
    from rung.serving.engine.llm import LLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["import os\n", "class Foo:\n    def", "x = [1, 2"]
    offline = LLM(model_dir).generate([tokenizer(p)["input_ids"] for p in prompts],
                                      SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    response = client.completions.create(model="tiny", prompt=prompts, max_tokens=20, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == [
        tokenizer.decode(c[0].token_ids) for c in offline]


def test_streaming_equals_non_streaming_for_the_same_seed_and_carries_usage(client):
    args = dict(model="tiny", messages=[{"role": "user", "content": "write code"}], max_tokens=24,
                temperature=0.9, seed=7)
    whole = client.chat.completions.create(**args).choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    stream = client.completions.create(model="tiny", prompt="def", max_tokens=10, temperature=0, stream=True)
    streamed = "".join(c.choices[0].text for c in stream)
    assert streamed == client.completions.create(model="tiny", prompt="def", max_tokens=10, temperature=0
                                                 ).choices[0].text


def test_n_seed_and_stop(client):
    two = client.completions.create(model="tiny", prompt="def f(", max_tokens=16, temperature=1.0, n=2, seed=3)
    again = client.completions.create(model="tiny", prompt="def f(", max_tokens=16, temperature=1.0, n=2, seed=3)
    assert [c.index for c in two.choices] == [0, 1]
    assert [c.text for c in two.choices] == [c.text for c in again.choices]
    greedy = client.completions.create(model="tiny", prompt="def f(", max_tokens=30, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = greedy[5:8]  # a stop string from inside the greedy text, likely spanning tokens
    cut = client.completions.create(model="tiny", prompt="def f(", max_tokens=30, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and cut.text == greedy[:greedy.index(stop)]


def test_async_clients_stream_concurrently(server):
    async def main() -> list[str]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": f"request {i}"}], max_tokens=16,
                temperature=0.7, seed=i, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

        texts = await asyncio.gather(*[one(i) for i in range(16)])
        await client.close()
        return texts

    texts = asyncio.run(main())
    assert len(texts) == 16 and all(isinstance(t, str) for t in texts) and len(set(texts)) > 1
    assert "async scheduling" in server.log.read_text()  # the flag reached the engine process


def error(response: tuple[int, dict, str]) -> tuple[int, dict]:
    status, _, body = response
    envelope = json.loads(body)["error"]
    assert set(envelope) == {"message", "type", "param", "code"}, envelope
    return status, envelope


def test_errors_use_the_openai_envelope_and_status(server, client):
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    status, err = error(http("POST", url, {"model": "tiny", "prompt": "x"}))
    assert status == 401 and err["type"] == "authentication_error"
    assert error(http("POST", url, {"model": "tiny", "prompt": "x"}, {"Authorization": "Bearer nope"}))[0] == 401
    status, err = error(http("POST", url, {"model": "gpt-9", "prompt": "x"}, auth))
    assert status == 404 and err["param"] == "model"
    for field, value in (("temperature", -1), ("top_p", 1.5), ("top_k", -2), ("n", 0), ("max_tokens", 100_000)):
        status, err = error(http("POST", url, {"model": "tiny", "prompt": "x", field: value}, auth))
        assert status == 400 and err["param"] == field, (field, err)
    status, err = error(http("POST", url, {"model": "tiny", "prompt": "word " * 400}, auth))
    assert status == 400 and err["param"] == "prompt" and "context window" in err["message"]
    status, err = error(http("POST", url, {"model": "tiny", "prompt": [[1, 99999]]}, auth))
    assert status == 400 and err["param"] == "prompt"
    status, err = error(http("POST", url, b"x" * (5 << 20), auth))
    assert status == 413 and len(err["message"]) < 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=[], max_tokens=1)
    assert caught.value.status_code == 400


def test_logit_bias_forces_and_bans_tokens(client, model_dir):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    forced = tokenizer.token_to_id("def")
    assert forced is not None
    ask = {"model": "tiny", "prompt": "import os\n", "max_tokens": 6, "extra_body": {"ignore_eos": True}}
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):  # greedy and sampled rows alike
        text = client.completions.create(**ask, **sampling, logit_bias={str(forced): 100}).choices[0].text
        assert text == "def" * 6, (sampling, text)
    first = client.completions.create(**{**ask, "max_tokens": 1}, temperature=0, logprobs=1).choices[0]
    (banned,) = tokenizer.encode(first.text, add_special_tokens=False).ids
    again = client.completions.create(**{**ask, "max_tokens": 1}, temperature=0, logprobs=1,
                                      logit_bias={str(banned): -100}).choices[0]
    assert again.text != first.text
    assert again.logprobs.token_logprobs[0] < first.logprobs.token_logprobs[0]  # the model's runner-up
    # chat takes it too; returned logprobs stay the model's own (before the bias), as vLLM's
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          temperature=0, logit_bias={str(forced): 100}, logprobs=True,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == "def" * 3
    assert all(entry.logprob < 0 for entry in chat.choices[0].logprobs.content)


def test_a_model_is_retrieved_by_id_and_fields_rung_cannot_honour_are_refused(server, client):
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-9")
    assert "tiny" in caught.value.message
    url, auth = f"{server.url}/v1/completions", {"Authorization": f"Bearer {KEY}"}
    for extra, param in (({"best_of": 3}, "best_of"), ({"suffix": "return x"}, "suffix"),
                         ({"logit_bias": {"def": 5}}, "logit_bias"), ({"logit_bias": {"²": 5}}, "logit_bias"),
                         ({"logit_bias": {"5": 101}}, "logit_bias"),
                         ({"logit_bias": {"999999": 1}}, "logit_bias"), ({"logit_bias": {"5": "high"}}, "logit_bias")):
        status, err = error(http("POST", url, {"model": "tiny", "prompt": "x", **extra}, auth))
        assert status == 400 and err["param"] == param and err["type"] == "invalid_request_error", (extra, err)
    for harmless in ({"best_of": 2, "n": 2}, {"suffix": ""}):  # the same as leaving them out: accepted
        status, _headers, _body = http("POST", url, {"model": "tiny", "prompt": "x", "max_tokens": 1, **harmless}, auth)
        assert status == 200, harmless


MALFORMED = [b"", b"{", b"[]", b"null", b"\xff\xfe\xfd", b'{"model": "tiny"}', b'{"prompt": "x"}',
             b'{"model": 5, "prompt": "x"}', b'{"model": "tiny", "prompt": 5}', b'{"model": "tiny", "prompt": []}',
             b'{"model": "tiny", "prompt": "x", "max_tokens": 1e400}',
             b'{"model": "tiny", "prompt": "x", "max_tokens": 99999999999999999999999}',
             b'{"model": "tiny", "prompt": "x", "temperature": "hot"}', b'{"model": "tiny", "prompt": "x", "n": 1e9}',
             b'{"model": "tiny", "prompt": "x", "stop": [1, 2]}', b'{"model": "tiny", "prompt": "x", "seed": -5}',
             b'{"model": "tiny", "prompt": [[-1]]}', b'{"model": "tiny", "prompt": "x", "logprobs": 50}',
             b'{"model": "tiny", "prompt": "x", "stream_options": 3}', b'{"model": "unknown", "prompt": "x"}']


def test_twenty_malformed_bodies_leave_the_server_healthy(server):
    assert len(MALFORMED) == 20
    for body in MALFORMED:
        status, headers, text = http("POST", f"{server.url}/v1/completions", body,
                                     {"Authorization": f"Bearer {KEY}"})
        assert status in (400, 404), (body, status, text)
        assert len(text) < 1000 and json.loads(text)["error"]["message"]
    assert http("GET", f"{server.url}/health")[0] == 200
    assert http("GET", f"{server.url}/ready")[0] == 200


def test_disconnecting_client_frees_its_blocks(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        body = json.dumps({"model": "tiny", "prompt": "def", "max_tokens": 120, "stream": True,
                           "extra": 1, "ignore_eos": True}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        received = b""
        while b"data:" not in received:  # streaming has begun
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = server.metrics()
        if metrics['rung_serve_kv_cache_usage_ratio{model_name="tiny"}'] == 0 and metrics[
                'rung_serve_requests_running{model_name="tiny"}'] == 0:
            break
        time.sleep(0.2)
    assert metrics['rung_serve_kv_cache_usage_ratio{model_name="tiny"}'] == 0
    assert metrics.get('rung_serve_request_success_total{finish_reason="abort",model_name="tiny"}', 0) >= 1


def test_metrics_pass_promtool_and_count_what_was_sent(server, client, tmp_path):
    before = server.metrics()
    for _ in range(3):
        client.completions.create(model="tiny", prompt="import", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    time.sleep(0.3)
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    assert delta('rung_serve_request_success_total{finish_reason="length",model_name="tiny"}') == 3
    assert delta('rung_serve_generation_tokens_total{model_name="tiny"}') == 15
    assert delta('rung_serve_prompt_tokens_total{model_name="tiny"}') == 3 * len(
        json.loads(http("POST", f"{server.url}/tokenize", {"prompt": "import"},
                        {"Authorization": f"Bearer {KEY}"})[2])["tokens"])
    assert delta('rung_serve_http_requests_total{model_name="tiny",route="/v1/completions",status="200"}') == 3
    exposition = tmp_path / "metrics.txt"
    exposition.write_text(http("GET", f"{server.url}/metrics")[2])
    result = subprocess.run(f"promtool check metrics < {exposition}", shell=True, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_tokenize_detokenize_version_and_openapi(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    tokens = json.loads(http("POST", f"{server.url}/tokenize", {"prompt": "héllo ✓"}, auth)[2])["tokens"]
    assert json.loads(http("POST", f"{server.url}/detokenize", {"tokens": tokens}, auth)[2])["prompt"] == "héllo ✓"
    assert json.loads(http("GET", f"{server.url}/version", headers=auth)[2])["version"]
    paths = json.loads(http("GET", f"{server.url}/openapi.json", headers=auth)[2])["paths"]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready"} <= set(paths)


def test_full_queue_gets_429_and_admitted_requests_complete(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "serve.log", "--max-queued-requests", "8", "--max-num-seqs", "2")
    try:
        results: list[int] = []

        def send() -> None:
            status, headers, _ = http("POST", f"{server.url}/v1/completions",
                                      {"model": "tiny", "prompt": "def", "max_tokens": 40, "ignore_eos": True})
            results.append(status)
            if status == 429:
                assert headers.get("retry-after") or headers.get("Retry-After")

        threads = [threading.Thread(target=send) for _ in range(100)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(results) == 100 and set(results) == {200, 429}, sorted(set(results))
        assert results.count(200) >= 8
    finally:
        server.stop()
    server = Server(model_dir, tmp_path / "serve-tokens.log", "--max-queued-tokens", "40", "--max-num-seqs", "1")
    try:
        prompt = "word " * 12
        tokens = len(json.loads(http("POST", f"{server.url}/tokenize", {"prompt": prompt})[2])["tokens"])
        assert 20 < tokens <= 40  # one such prompt fits the bound, two do not
        statuses: list[int] = []

        def send(max_tokens: int) -> None:
            statuses.append(http("POST", f"{server.url}/v1/completions", {
                "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})[0])

        threads = [threading.Thread(target=send, args=(40,)) for _ in range(6)]  # at once: one runs, one waits
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert len(statuses) == 6 and 200 in statuses and 429 in statuses, statuses
        send(2)
        assert statuses[-1] == 200  # alone again, the same prompt is admitted
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "serve.log", "--max-num-seqs", "1")
    results: list[tuple[int, str]] = []
    thread = threading.Thread(target=lambda: results.append(http(
        "POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "def", "max_tokens": 100,
                                                  "ignore_eos": True})[::2]))
    thread.start()
    time.sleep(0.5)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    try:
        late = http("GET", f"{server.url}/ready")[0]
    except OSError:
        late = None  # already closed: also a refusal
    thread.join(60)
    assert server.process.wait(30) == 0
    assert late in (503, None)
    status, body = results[0]
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 100
    log = (tmp_path / "serve.log").read_text()
    assert "draining" in log and ", sync scheduling," in log  # a CPU's default ("async scheduling" would not match)


def test_a_dead_engine_process_fails_health_and_answers_503(model_dir, tmp_path):
    """`rung serve` steps the engine in a process of its own: if it dies, the server says so instead of hanging."""
    server = Server(model_dir, tmp_path / "serve.log")
    try:
        children = subprocess.run(["pgrep", "-a", "-P", str(server.process.pid)], capture_output=True,
                                  text=True).stdout.splitlines()
        engines = [line for line in children if "spawn_main" in line]
        assert len(engines) == 1, children
        assert http("GET", f"{server.url}/health")[0] == 200
        os.kill(int(engines[0].split()[0]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while http("GET", f"{server.url}/health")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http("GET", f"{server.url}/health")[0] == 503
        status, _, text = http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "def",
                                                                        "max_tokens": 4})
        assert status == 503 and json.loads(text)["error"]["type"] == "service_unavailable", text
        assert "engine process stopped" in json.loads(text)["error"]["message"]
    finally:
        server.stop()


def test_bad_serve_invocations_fail_cleanly(model_dir, tmp_path):
    from conftest import assert_clean_failure

    assert_clean_failure(run_rung("serve", str(tmp_path / "missing")), "model folder not found")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_clean_failure(run_rung("serve", str(model_dir), "--port", str(port)), f"port {port}", "in use")


def test_ray_serve_mode_serves_the_same_api_with_two_replicas(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "serve.log", "--ray", "--replicas", "2")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        texts = {client.completions.create(model="tiny", prompt="def", max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text for _ in range(4)}
        assert len(texts) == 1  # greedy: the same answer whichever replica served it
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=6, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens > 0
        status, err = error(http("POST", f"{server.url}/v1/completions", {"model": "tiny", "prompt": "x",
                                                                         "top_p": 3}))
        assert status == 400 and err["param"] == "top_p"
    finally:
        server.stop()
    assert server.process.returncode == 0
    log = (tmp_path / "serve.log").read_text()
    assert "on Ray Serve (replicas: 2)" in log and "shutting down the Ray Serve application" in log


def test_bench_serve_drives_64_concurrent_streams_without_errors(server, tmp_path):
    """The load acceptance: 64 concurrent streaming clients × 4 requests each, through `rung bench serve`."""
    result = run_rung("bench", "serve", "--base-url", f"{server.url}/v1", "--model", "tiny", "--api-key", KEY,
                      "--num-prompts", "256", "--max-concurrency", "64", "--random-input-len", "24",
                      "--random-output-len", "12", "--goodput", "ttft:60000,e2el:120000", "--json",
                      str(tmp_path / "bench.json"), "--plot", str(tmp_path / "bench.png"), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "bench.json").read_text())
    assert summary["successful_requests"] == 256 and summary["failed_requests"] == 0, summary["errors"]
    assert summary["output_token_throughput"] > 0 and summary["ttft"]["p99_ms"] >= summary["ttft"]["median_ms"]
    assert summary["goodput"] > 0 and len(summary["requests"]) == 256
    assert all(r["output_tokens"] >= 6 for r in summary["requests"])  # ignore_eos: the asked length, ±50%
    assert (tmp_path / "bench.png").stat().st_size > 1000 and "output tokens/s" in result.stdout
    # the server is idle again with every block free
    time.sleep(0.5)
    assert server.metrics()['rung_serve_kv_cache_usage_ratio{model_name="tiny"}'] == 0


@pytest.fixture(scope="module")
def special_model(model_dir, tmp_path_factory):
    """The tiny model rewired to generate only special tokens: the final norm keeps one channel, and only
    <|im_start|> (+) and <|im_end|> (−, the EOS) read it, so whatever the input the argmax is one of the two."""
    import shutil

    from safetensors.torch import save_file

    from rung.platform.tensor_files import load_tensors

    folder = tmp_path_factory.mktemp("special") / "model"
    shutil.copytree(model_dir, folder)
    (weights,) = folder.glob("*.safetensors")
    tensors = load_tensors(weights)
    tensors["model.norm.weight"].zero_()[0] = 1.0
    readout = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    readout[:, 0] = 0.0
    readout[1, 0], readout[2, 0] = 100.0, -100.0
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder


def test_generated_special_tokens_are_left_out_of_text_unless_asked_for(special_model, tmp_path):
    server = Server(special_model, tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        ask = {"model": "tiny", "prompt": "def", "max_tokens": 6, "temperature": 0}
        plain = client.completions.create(**ask, extra_body={"ignore_eos": True})
        assert plain.usage.completion_tokens == 6 and plain.choices[0].text == ""
        streamed = client.completions.create(**ask, stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == ""
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, stream=True,
                                              extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].delta.content or "" for chunk in chat if chunk.choices) == ""
        kept = client.completions.create(**ask, extra_body={"ignore_eos": True, "skip_special_tokens": False})
        text = kept.choices[0].text
        assert text and text.replace("<|im_start|>", "").replace("<|im_end|>", "") == ""
        # skipped, a special token cannot match a stop string; kept, it can
        unmatched = client.completions.create(**ask, stop=["<|im_start|>", "<|im_end|>"],
                                              extra_body={"ignore_eos": True})
        assert unmatched.choices[0].finish_reason == "length" and unmatched.usage.completion_tokens == 6
        matched = client.completions.create(**ask, stop=["<|im_start|>", "<|im_end|>"],
                                            extra_body={"ignore_eos": True, "skip_special_tokens": False})
        assert matched.choices[0].finish_reason == "stop" and matched.choices[0].text == ""
        assert matched.usage.completion_tokens == 1
    finally:
        server.stop()


def test_bench_serve_conversations_resend_their_history_and_hit_the_prefix_cache(server, tmp_path):
    """--turns 3 --prefix-len 20 (within the tiny model's 128-token window): every turn's prompt holds the previous
    turn's prompt and reply, and the shared prefix plus the resent history are found in the prefix cache."""
    before = server.metrics()
    result = run_rung("bench", "serve", "--base-url", f"{server.url}/v1", "--model", "tiny", "--api-key", KEY,
                      "--num-prompts", "6", "--turns", "3", "--prefix-len", "20", "--max-concurrency", "4",
                      "--random-input-len", "4", "--random-output-len", "6", "--json", str(tmp_path / "turns.json"),
                      timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "turns.json").read_text())
    assert summary["successful_requests"] == 18 and summary["turns"] == 3 and summary["prefix_len"] == 20
    for conversation in range(6):
        turns = sorted((r for r in summary["requests"] if r["conversation"] == conversation), key=lambda r: r["turn"])
        assert [r["turn"] for r in turns] == [0, 1, 2]
        for earlier, later in zip(turns, turns[1:]):
            assert later["prompt_tokens"] > earlier["prompt_tokens"] + earlier["output_tokens"] - 2  # ± a merge
    after = server.metrics()
    hits, queries = (after[name] - before[name] for name in (f"rung_serve_prefix_cache_{kind}_total{LABEL}"
                                                             for kind in ("hits", "queries")))
    assert hits > 0.4 * queries > 0
    for flags, needle in ((("--turns", "0"), "--turns must be at least 1"),
                          (("--prefix-len", "3", "--dataset", str(tmp_path / "turns.json")), "--dataset random")):
        bad = run_rung("bench", "serve", "--base-url", f"{server.url}/v1", "--model", "tiny", *flags)
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr


def test_bench_serve_reports_bad_input_and_failures(tmp_path):
    from conftest import assert_clean_failure

    assert_clean_failure(run_rung("bench", "serve", "--base-url", "http://127.0.0.1:9/v1", "--model", "x",
                                  "--dataset", str(tmp_path / "none.jsonl")), "not 'random' and not a file")
    assert_clean_failure(run_rung("bench", "serve", "--base-url", "http://127.0.0.1:9/v1", "--model", "x",
                                  "--goodput", "latency:5"), "unknown SLO")
    nobody = run_rung("bench", "serve", "--base-url", "http://127.0.0.1:9/v1", "--model", "x", "--num-prompts", "3")
    assert nobody.returncode == 1 and "failed requests" in nobody.stdout and "Traceback" not in nobody.stderr
    unsent = run_rung("bench", "serve", "--base-url", "http://127.0.0.1:9/v1", "--model", "x", "--num-prompts", "2",
                      "--turns", "3", "--json", str(tmp_path / "unsent.json"))
    summary = json.loads((tmp_path / "unsent.json").read_text())
    assert unsent.returncode == 1 and summary["failed_requests"] == 6  # a failed first turn: its later two unsent
    assert sum("not sent" in r["error"] for r in summary["requests"]) == 4


def test_tune_stores_a_split_per_device_and_model_that_the_engine_uses(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    result = run_rung("serve", str(model_dir), "--tune", "--max-num-batched-tokens", "128")
    assert result.returncode == 0, result.stderr[-2000:]
    from rung.serving.config import EngineConfig
    from rung.serving.engine.engine import Engine, resolve_device
    from rung.serving.worker.tuning import CANDIDATES, tune_path

    path = tune_path(model_dir, resolve_device(None))
    assert str(path).startswith(str(tmp_path)) and path.with_suffix(".png").stat().st_size > 1000
    tuned = json.loads(path.read_text())
    assert set(tuned["step_ms"]) == {"16", "64", "128"}
    assert all(set(row) == {str(p) for p in CANDIDATES} for row in tuned["step_ms"].values())
    assert tuned["nano_batches"] == min(CANDIDATES, key=lambda p: sum(r[str(p)] for r in tuned["step_ms"].values()))
    assert Engine(model_dir, EngineConfig(num_blocks=64)).nano_batches == tuned["nano_batches"]
    assert Engine(model_dir, EngineConfig(num_blocks=64, nano_batches=3)).nano_batches == 3
