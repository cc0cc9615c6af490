"""Hostile and careless input, against the real `rung serve` and `rung train` / `rung export` processes: every case
a review broke the product with, and a generated corpus of bodies. The rule for the server: no 5xx (503 only while
starting, draining or dead), every error OpenAI's envelope naming the field, and the server healthy afterwards. For
the command line: exit 2 with a message, no traceback, no partial directory, nothing written outside out_dir."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest
from conftest import Server, assert_clean_failure, http, run_rung
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

KEY = "sécret-κλειδί"  # a non-ASCII key: compared as bytes, never an error
AUTH = {"Authorization": f"Bearer {KEY}".encode().decode("latin-1")}  # headers travel as bytes (latin-1 in http)
MAX_QUEUED = 8


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    server = Server(model_dir, tmp_path_factory.mktemp("log") / "serve.log", "--api-key", KEY,
                    "--max-queued-requests", str(MAX_QUEUED))
    yield server
    server.stop()


def post(server, path: str, raw: str | bytes, headers: dict | None = None) -> tuple[int, dict]:
    status, _, text = http("POST", server.url + path, raw.encode() if isinstance(raw, str) else raw,
                           {**AUTH, **(headers or {})})
    return status, json.loads(text)


def assert_refused(server, path: str, raw: str, param: str | None, *words: str) -> None:
    status, body = post(server, path, raw)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param, body
    for word in words:
        assert word in body["error"]["message"], body


def assert_healthy(server) -> None:
    assert http("GET", f"{server.url}/health")[0] == 200
    assert http("GET", f"{server.url}/ready")[0] == 200


def test_a_lone_surrogate_is_a_400_naming_the_field(server):
    assert_refused(server, "/v1/completions", '{"model":"tiny","prompt":"a\\ud800b","max_tokens":2}', "prompt",
                   "surrogate")
    assert_refused(server, "/v1/completions", '{"model":"tiny","prompt":["ok","\\udfff"],"max_tokens":2}',
                   "prompt.1", "surrogate")
    assert_refused(server, "/v1/chat/completions", '{"model":"tiny","messages":[{"role":"user","content":'
                   '"a\\ud800b"}],"max_tokens":2}', "messages.0.content", "surrogate")
    assert_refused(server, "/tokenize", '{"model":"tiny","prompt":"a\\ud800b"}', "prompt", "surrogate")
    assert_refused(server, "/v1/completions", '{"model":"tiny","prompt":"a","stop":["\\ud800"],"max_tokens":2}',
                   "stop.0", "surrogate")
    assert_healthy(server)


def test_api_keys_compare_as_bytes_the_scheme_in_any_case_and_only_probes_are_open(server):
    assert http("GET", f"{server.url}/v1/models", headers=AUTH)[0] == 200
    assert http("GET", f"{server.url}/v1/models",
                headers={"Authorization": f"bearer {KEY}".encode().decode("latin-1")})[0] == 200
    for wrong in ("Bearer s\u00e9cret", "Bearer \u00ff\u00fe", "Basic abc", "Bearer", ""):
        status, _, text = http("GET", f"{server.url}/v1/models", headers={"Authorization": wrong})
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key", (wrong, text)
    for path in ("/version", "/openapi.json", "/docs", "/v1/models"):
        assert http("GET", server.url + path)[0] == 401, path
    for path in ("/health", "/ready", "/metrics"):
        assert http("GET", server.url + path)[0] == 200, path
    # the key is checked before the body limit: an unknown client learns nothing about the server's limits
    status, _, text = http("POST", f"{server.url}/v1/completions", b"{}", {"Content-Length": str(64 << 20)})
    assert status == 401, text


def test_bodies_over_the_limit_are_stopped_as_they_arrive_even_chunked(server):
    status, body = post(server, "/v1/completions", b"x" * (5 << 20))
    assert status == 413 and body["error"]["code"] == "request_too_large"
    connection = HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", "/v1/completions")
    for name, value in {**AUTH, "Content-Type": "application/json", "Transfer-Encoding": "chunked"}.items():
        connection.putheader(name, value)
    connection.endheaders()
    started = time.monotonic()
    prompt = json.dumps({"model": "tiny", "max_tokens": 1, "prompt": "x" * (5 << 20)}).encode()
    try:
        for offset in range(0, len(prompt), 1 << 16):
            chunk = prompt[offset:offset + (1 << 16)]
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    except OSError:
        pass  # the server answered and closed while the rest was on its way: also a refusal
    response = connection.getresponse()
    assert response.status == 413, response.read()
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    assert time.monotonic() - started < 5  # stopped at the limit, not tokenized (a 5 MiB prompt takes ~10 s here)
    assert_healthy(server)


def test_a_huge_prompt_is_tokenized_off_the_event_loop(server):
    prompt = "def f(x):\n    return x + 1\n" * 120_000  # 3.2 MB: seconds of tokenization on this machine
    done: list[float] = []

    def tokenize() -> None:
        started = time.monotonic()
        post(server, "/tokenize", json.dumps({"model": "tiny", "prompt": prompt}))
        done.append(time.monotonic() - started)

    thread = threading.Thread(target=tokenize)
    thread.start()
    time.sleep(0.3)
    probes = []
    while thread.is_alive() and len(probes) < 50:
        started = time.monotonic()
        assert http("GET", f"{server.url}/health")[0] == 200
        probes.append(time.monotonic() - started)
        time.sleep(0.05)
    thread.join()
    assert done and done[0] > 1.0, done  # the tokenization was long enough to have stalled a blocked loop
    assert len(probes) >= 3 and max(probes) < 1.0, probes


def test_a_request_larger_than_the_queue_bound_is_a_400_not_a_429_to_retry(server):
    raw = json.dumps({"model": "tiny", "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1})  # 9 > MAX_QUEUED
    assert_refused(server, "/v1/completions", raw, "n", "n × prompts")
    status, _ = post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": ["a", "b"], "n": 4,
                                                            "max_tokens": 1}))
    assert status == 200  # exactly the bound fits


@pytest.mark.parametrize("raw, param", [
    ('{"model":"tiny","prompt":"a","max_tokens":2,"temperature":Infinity}', "temperature"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"temperature":1e400}', "temperature"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"top_p":NaN}', "top_p"),
    ('{"model":"tiny","prompt":"a","max_tokens":"5"}', "max_tokens"),
    ('{"model":"tiny","prompt":"a","max_tokens":true}', "max_tokens"),
    ('{"model":"tiny","prompt":"a","max_tokens":2.5}', "max_tokens"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"stream":"yes"}', "stream"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"temperature":"0.5"}', "temperature"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"stop":[""]}', "stop"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"stop":""}', "stop"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"stop_token_ids":[-1]}', "stop_token_ids.0"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"stop_token_ids":[99999999]}', "stop_token_ids"),
    ('{"model":"tiny","prompt":[1, -3],"max_tokens":2}', "prompt.1"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"echo":true,"logprobs":1}', "echo"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"skip_special_tokens":"no"}', "skip_special_tokens"),
    ('{"model":"tiny","prompt":"a","max_tokens":2,"spaces_between_special_tokens":1}',
     "spaces_between_special_tokens"),
])
def test_lenient_completion_fields_are_refused(server, raw, param):
    assert_refused(server, "/v1/completions", raw, param)


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user"}], "messages.0"),
    ([{"role": "system", "content": None}], "messages.0"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages.0.content.0.type"),
    ([{"role": "user", "content": 5}], "messages.0.content"),
])
def test_lenient_chat_messages_are_refused(server, messages, param):
    assert_refused(server, "/v1/chat/completions", json.dumps({"model": "tiny", "messages": messages,
                                                               "max_tokens": 2}), param)


def test_usage_counts_each_prompt_once_and_echo_repeats_the_prompt_as_sent(server):
    tokens = post(server, "/tokenize", json.dumps({"model": "tiny", "prompt": "def main():"}))[1]["count"]
    status, body = post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "def main():", "n": 3,
                                                               "max_tokens": 2, "ignore_eos": True}))
    assert status == 200 and body["usage"]["prompt_tokens"] == tokens, body  # as vLLM and OpenAI count it
    assert body["usage"]["completion_tokens"] == 6
    status, body = post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "def main():",
                                                               "echo": True, "max_tokens": 1}))
    assert status == 200 and body["choices"][0]["text"].startswith("def main():"), body
    ids = post(server, "/tokenize", json.dumps({"model": "tiny", "prompt": "import os"}))[1]["tokens"]
    status, body = post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": ids, "echo": True,
                                                               "max_tokens": 1}))
    assert status == 200 and body["choices"][0]["text"].startswith("import os"), body  # no <|bos|> in front


def test_a_client_that_disconnects_mid_upload_is_not_an_error(server):
    with open(server.log) as log:
        log.seek(0, 2)
        with socket_to(server) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Authorization: Bearer {KEY}".encode() + b"\r\nContent-Length: 10000\r\n\r\n{\"model\"")
            time.sleep(0.3)
        time.sleep(0.5)
        assert_healthy(server)
        written = log.read()
    assert "Traceback" not in written and "ERROR" not in written, written


def socket_to(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20) | st.sampled_from(["\ud800", "", "tiny", "user", "assistant", "text"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)
VALID = {
    "/v1/completions": {"model": "tiny", "prompt": "def", "max_tokens": 2},
    "/v1/chat/completions": {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/tokenize": {"model": "tiny", "prompt": "def"},
    "/detokenize": {"model": "tiny", "tokens": [1, 2]},
}
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "stop_token_ids", "n", "presence_penalty", "frequency_penalty",
          "repetition_penalty", "min_tokens", "ignore_eos", "stream", "stream_options", "priority", "echo",
          "logprobs", "top_logprobs", "tokens", "add_special_tokens", "user"]


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                     HealthCheck.too_slow])
@given(path=st.sampled_from(sorted(VALID)), changes=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES,
                                                                     max_size=3))
def test_generated_bodies_never_get_a_5xx(server, path, changes):
    body = {**VALID[path], **changes}
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool):
        body["max_tokens"] = min(body["max_tokens"], 8)  # bounded work: the corpus is about input, not length
    status, _, text = http("POST", server.url + path, json.dumps(body).encode(), AUTH)
    assert status < 500, (body, status, text)
    if status >= 400:
        error = json.loads(text)["error"]
        assert error["message"] and error["type"], text
    elif body.get("stream") is not True:
        json.loads(text)


def test_the_server_is_healthy_after_the_corpus(server):
    assert_healthy(server)
    metrics = server.metrics()
    assert not any(name.startswith("rung_serve_http_requests_total") and 'status="5' in name for name in metrics), \
        [name for name in metrics if 'status="5' in name]


# -- model folders that do not match their config ---------------------------------------------------------------------
def _folder(model_dir: Path, tmp_path: Path, name: str, config_text: str | None = None, **changes) -> Path:
    folder = tmp_path / name
    shutil.copytree(model_dir, folder)
    if config_text is None:
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        config_text = json.dumps({k: v for k, v in config.items() if v is not None})
    (folder / "config.json").write_text(config_text)
    return folder


def test_model_folders_that_do_not_match_their_weights_are_refused_at_start(model_dir, tmp_path):
    config = json.loads((model_dir / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    cases = [
        (dict(num_hidden_layers=layers - 1), f"the weights hold {layers} layers"),
        (dict(intermediate_size=config["intermediate_size"] + 8), "mlp.gate_proj.weight"),
        (dict(num_attention_heads=0), "num_attention_heads must be a positive integer"),
        (dict(num_attention_heads=heads + 1, num_key_value_heads=heads + 1, head_dim=None), "not divisible"),
        (dict(rms_norm_eps=-1), "rms_norm_eps must be a positive number"),
        (dict(hidden_size="64"), "hidden_size must be a positive integer"),
    ]
    folders = [(_folder(model_dir, tmp_path, f"case{i}", **change), needle) for i, (change, needle) in
               enumerate(cases)]
    folders.append((_folder(model_dir, tmp_path, "array", "[1, 2]"), "must hold a JSON object"))
    text = (model_dir / "config.json").read_text()
    folders.append((_folder(model_dir, tmp_path, "truncated", text[:len(text) // 2]), "config.json is not valid JSON"))
    garbled = _folder(model_dir, tmp_path, "garbled-weights", text)
    (garbled / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes()[:40])
    folders.append((garbled, "is not a readable safetensors file"))
    with ThreadPoolExecutor(2) as pool:  # two CLI start-ups at a time: each is a second or more of imports
        results = list(pool.map(lambda case: run_rung("serve", str(case[0]), "--port", "1"), folders))
    for (folder, needle), result in zip(folders, results):
        assert result.returncode == 2, (folder.name, result.stderr)
        assert_clean_failure(result, needle)


# -- training and export ----------------------------------------------------------------------------------------------
def test_training_refuses_bad_values_before_writing_anything(tmp_path, data_cache):
    out = tmp_path / "runs"
    cases = [(["name=../../escaped"], "name"), (["name=a/b"], "name"), (["train.betas=[2,3]"], "betas"),
             (["train.betas=[0.9]"], "betas"), (["train.lr=nan"], "lr"), (["train.lr=inf"], "lr"),
             (["train.weight_decay=nan"], "weight_decay"), (["data.sources=[/no/such/corpus.txt]"], "corpus"),
             (["train.optimizer=lion"], "train.optimizer"), (["train.muon_momentum=0.9"], "muon_momentum"),
             (["train.optimizer=muon", "train.muon_momentum=1.5"], "muon_momentum"),
             (["train.optimizer=muon", "train.zero_stage=2"], "muon preconditions whole matrices"),
             (["train.damping=1e-4"], "damping"), (["train.optimizer=shampoo", "train.damping=0"], "damping"),
             (["train.optimizer=shampoo", "train.damping=-1"], "damping"),
             (["train.optimizer=muon", "train.precondition_every=5"], "precondition_every"),
             (["train.optimizer=shampoo", "train.precondition_every=0"], "precondition_every"),
             (["train.optimizer=shampoo", "train.zero_stage=1"], "shampoo preconditions whole matrices"),
             (["train.optimizer=soap", "train.damping=1e-3"], "damping"),
             (["train.optimizer=soap", "train.zero_stage=2"], "soap preconditions whole matrices"),
             (["train.precondition_block=16"], "precondition_block"),
             (["train.layerdrop=1"], "layerdrop"), (["train.layerdrop=-0.1"], "layerdrop"),
             (["train.layerdrop=0.2", "train.zero_stage=3"], "train.layerdrop"),
             (["train.optimizer=soap", "train.precondition_block=0"], "precondition_block"),
             (["train.optimizer=soap", "train.precondition_block=48"], "does not divide every hidden matrix"),
             (["train.optimizer=kfac", "train.zero_stage=1"], "kfac preconditions whole matrices"),
             (["train.optimizer=kfac", "train.compile=true"], "train.compile"),
             (["train.optimizer=kfac", "model.moe.n_experts=4", "model.moe.top_k=2", "train.workers=2",
               "train.expert_parallel=2"], "expert parallelism gives workers different experts")]
    common = ["train", "tiny", "--set", f"out_dir={out}", "--set", f"data.cache_dir={data_cache}",
              "--set", "train.steps=2", "--set", "train.warmup_steps=0"]
    with ThreadPoolExecutor(2) as pool:  # two CLI start-ups at a time: each is a second or more of imports
        results = list(pool.map(lambda case: run_rung(*common, *[a for s in case[0] for a in ("--set", s)]), cases))
    for (sets, needle), result in zip(cases, results):
        assert result.returncode == 2, (sets, result.stderr[-2000:])
        assert_clean_failure(result, needle)
    assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


def _trained_run(model_dir: Path, tmp_path: Path) -> Path:
    """A copy of the served model's training run (60 steps, a checkpoint at the end)."""
    run = tmp_path / "runs" / "tiny"
    shutil.copytree(model_dir.parent / "tiny", run)
    return run


def _garble_weights_keeping_checksums(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest["files"]["model.safetensors"] = digest
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def test_resume_with_no_verifiable_checkpoint_refuses_unless_restart(model_dir, tmp_path, data_cache):
    run = _trained_run(model_dir, tmp_path)
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    assert checkpoints
    for checkpoint in checkpoints:
        (checkpoint / "optimizer.safetensors").write_bytes(b"damaged")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    args = ["train", "tiny", "--set", f"out_dir={run.parent}", "--set", "name=tiny", "--set",
            f"data.cache_dir={data_cache}", "--set", "train.steps=62", "--resume"]
    result = run_rung(*args)
    assert_clean_failure(result, "none of the", "--restart")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing changed
    result = run_rung(*args, "--restart")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(1, 63))  # from step 0 again, each step once
    assert [p.name for p in sorted((run / "checkpoints").glob("step_*"))] == ["step_00000062"]


def test_export_and_resume_refuse_a_garbled_header_that_matches_its_checksums(model_dir, tmp_path, data_cache):
    run = _trained_run(model_dir, tmp_path)
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    _garble_weights_keeping_checksums(checkpoint)
    result = run_rung("export", str(run), "--out", str(tmp_path / "out"))
    assert_clean_failure(result, "model.safetensors is not a readable safetensors file")
    assert not (tmp_path / "out").exists()
    result = run_rung("train", "tiny", "--set", f"out_dir={run.parent}", "--set", "name=tiny", "--set",
                      f"data.cache_dir={data_cache}", "--set", "train.steps=62", "--resume")
    assert_clean_failure(result, "is not a readable safetensors file")


def test_export_refuses_an_out_below_a_file_and_a_zero_shard_size(model_dir, tmp_path):
    run = model_dir.parent / "tiny"
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run_rung("export", str(run), "--out", str(blocker / "model"))
    assert_clean_failure(result, "cannot create")
    assert blocker.read_text() == "keep me"
    result = run_rung("export", str(run), "--out", str(tmp_path / "out"), "--max-shard-size", "0")
    assert_clean_failure(result, "--max-shard-size")
    assert not (tmp_path / "out").exists()
