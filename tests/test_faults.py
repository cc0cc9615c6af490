"""Faults while requests are in flight, against a real `rung serve`: clients that go away, a drain whose grace
period runs out, a second signal, an engine process killed. Each asserts what every client receives and that the
KV cache returns to empty."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest
from conftest import Server, http

# `make test` runs this module alone, after the rest: drains are timed against their grace period
pytestmark = pytest.mark.serial

LONG = {"model": "tiny", "prompt": "def", "max_tokens": 4000, "ignore_eos": True}  # seconds: past every wait here


@pytest.fixture(scope="module")
def long_model(model_dir, tmp_path_factory) -> Path:
    """The served tiny model with a context window long enough for requests that outlast each test's wait (RoPE
    has no learned positions, so the same weights serve a longer window)."""
    folder = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return folder


def kv_and_running(server) -> tuple[float, float]:
    metrics = server.metrics()
    return (metrics['rung_serve_kv_cache_usage_ratio{model_name="tiny"}'],
            metrics['rung_serve_requests_running{model_name="tiny"}'])


def wait_until_idle(server, seconds: float = 20) -> tuple[float, float]:
    deadline = time.monotonic() + seconds
    while (state := kv_and_running(server)) != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    return state


def send_raw(server, path: str, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    data = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
                 f"{len(data)}\r\n\r\n".encode() + data)
    return sock


def chat(stream: bool) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": stream}


@pytest.fixture(scope="module")
def server(long_model, tmp_path_factory):
    server = Server(long_model, tmp_path_factory.mktemp("log") / "serve.log")
    yield server
    server.stop()


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {**LONG, "stream": False}), ("/v1/completions", {**LONG, "stream": True}),
    ("/v1/chat/completions", chat(False)), ("/v1/chat/completions", chat(True)),
    ("/v1/completions", {**LONG, "prompt": ["def", "import"], "n": 2}),
], ids=["completion", "completion-stream", "chat", "chat-stream", "batch-n2"])
def test_a_client_that_goes_away_aborts_its_requests(server, path, body):
    def finished(reason: str) -> float:
        return server.metrics().get(f'rung_serve_request_success_total{{finish_reason="{reason}",'
                                    f'model_name="tiny"}}', 0)

    aborted, ran_out = finished("abort"), finished("length")
    socks = [send_raw(server, path, body) for _ in range(4)]
    deadline = time.monotonic() + 20
    while kv_and_running(server)[1] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kv_and_running(server)[1] >= 4
    for sock in socks:
        sock.close()
    assert wait_until_idle(server, 10) == (0, 0)
    assert finished("abort") - aborted >= 4 and finished("length") == ran_out  # aborted, not run to the end


def start_clients(server, count: int = 4) -> tuple[list[threading.Thread], dict]:
    """`count` long requests, alternately streamed and not; their (status, body) land in the dict."""
    results: dict[int, tuple[int, str]] = {}

    def run(index: int) -> None:
        connection = HTTPConnection("127.0.0.1", server.port, timeout=120)
        connection.request("POST", "/v1/completions", json.dumps({**LONG, "stream": index % 2 == 0}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        results[index] = (response.status, response.read().decode())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while kv_and_running(server)[1] < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return threads, results


def assert_told(results: dict, count: int, *words: str) -> None:
    """Every stream ended with an error event and [DONE]; every other request got a 503 envelope."""
    assert sorted(results) == list(range(count))
    for index, (status, text) in results.items():
        if index % 2 == 0:
            events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
            assert status == 200 and events[-1] == "[DONE]", text[-500:]
            error = json.loads(events[-2])["error"]
            assert error["type"] == "service_unavailable" and all(w in error["message"] for w in words), error
        else:
            error = json.loads(text)["error"]
            assert status == 503 and error["type"] == "service_unavailable", text
            assert all(w in error["message"] for w in words), error


def test_a_drain_keeps_its_grace_period_and_tells_every_client(long_model, tmp_path):
    server = Server(long_model, tmp_path / "serve.log", "--grace-period", "2")
    try:
        threads, results = start_clients(server)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        took = time.monotonic() - signalled
        for thread in threads:
            thread.join(10)
        assert 2 <= took < 5, took  # the grace period, then the cut-off's flush and the shutdown; one clock
        assert_told(results, 4, "grace period of 2 s is over")
    finally:
        server.stop()


def test_a_second_signal_ends_the_drain_at_once(long_model, tmp_path):
    server = Server(long_model, tmp_path / "serve.log", "--grace-period", "60")
    try:
        threads, results = start_clients(server)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        assert time.monotonic() - signalled < 4
        for thread in threads:
            thread.join(10)
        assert_told(results, 4, "a second signal")
    finally:
        server.stop()


def test_an_engine_killed_mid_stream_is_visible_to_every_client_and_to_readiness(long_model, tmp_path):
    server = Server(long_model, tmp_path / "serve.log")
    try:
        threads, results = start_clients(server)
        children = subprocess.run(["pgrep", "-a", "-P", str(server.process.pid)], capture_output=True,
                                  text=True).stdout.splitlines()
        engines = [line for line in children if "spawn_main" in line]
        assert len(engines) == 1, children
        os.kill(int(engines[0].split()[0]), signal.SIGKILL)
        for thread in threads:
            thread.join(20)
        assert_told(results, 4, "engine process stopped")
        assert http("GET", f"{server.url}/ready")[0] == 503
        assert http("GET", f"{server.url}/health")[0] == 503
        assert kv_and_running(server) == (0, 0)  # the gauges say a dead engine runs nothing
    finally:
        server.stop()
