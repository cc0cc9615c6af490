"""Shared fixtures. Tests run real code: real tokenizers, real DeepSpeed engines, real subprocesses of `rung`."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# No GPU here: Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when it is first imported,
# so it is set before anything can import it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache per test session, so the built-in corpus is tokenized once and reused by later tests."""
    return tmp_path_factory.mktemp("data-cache")


def run_rung(*args: str, cwd: Path | None = None, timeout: float = 600,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `rung` command line in a fresh process, as a user would (`env` adds to this process's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rung.cli", *args], cwd=cwd or REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@dataclass(frozen=True)
class RayHead:
    gcs: str  # host:port, what `--address` of `rung train` / `sweep` takes
    dashboard: str  # http://host:port, the Jobs API of `rung submit` / `rung jobs`
    env: dict[str, str]  # what a client needs: the token, Ray's loopback setting


@contextmanager
def ray_head() -> Iterator[RayHead]:
    """A real `ray start --head` cluster on 127.0.0.1 (2 CPUs) with token authentication, as a user's would be.
    Started with --block, so stopping this one process stops every process the cluster started."""
    token = secrets.token_hex(16)
    gcs, dashboard, agent_http, agent_grpc, runtime_env = (free_port() for _ in range(5))
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                  "RAY_USAGE_STATS_ENABLED": "0"}
    env = {**os.environ, **client_env, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
                             # own agent ports: another Ray on this machine (an embedded one) holds the defaults
                             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_env}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", dashboard), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(head.pid, signal.SIGKILL)
        pytest.fail("the Ray head did not start")
    try:
        yield RayHead(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", client_env)
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # --block: the head tears down every process it started
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:  # Ray's graceful teardown can take half a minute; its processes share the group
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gcs), timeout=1).close()


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, a one-line message naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, data_cache) -> Path:
    """A tiny model trained for 60 steps and exported to a Hugging Face folder, for the serving tests."""
    root = tmp_path_factory.mktemp("served-model")
    result = run_rung("train", "tiny", "--set", f"out_dir={root}", "--set", "name=tiny", "--set",
                      f"data.cache_dir={data_cache}", "--set", "train.steps=60")
    assert result.returncode == 0, result.stderr[-2000:]
    result = run_rung("export", str(root / "tiny"), "--out", str(root / "model"))
    assert result.returncode == 0, result.stderr[-2000:]
    return root / "model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A `rung serve` process; stopped by PID."""

    def __init__(self, model_dir: Path, log: Path, *flags: str, python: str = sys.executable,
                 env: dict | None = None, timeout: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log = log
        self.process = subprocess.Popen([python, "-m", "rung.cli", "serve", str(model_dir), "--port",
                                          str(self.port), "--served-model-name", "tiny", *flags], cwd=REPO, env=env,
                                         stdout=log.open("w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, log.read_text()
            try:
                if http("GET", f"{self.url}/ready")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("server did not become ready:\n" + log.read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def metrics(self) -> dict[str, float]:
        text = http("GET", f"{self.url}/metrics")[2]
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None
         ) -> tuple[int, dict, str]:
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json",
                                                                            **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read().decode()
