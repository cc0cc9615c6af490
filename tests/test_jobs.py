"""`rung submit` / `rung jobs` against a real `ray start --head` cluster on 127.0.0.1 with token authentication."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_clean_failure


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rung(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rung.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """A head node started with --block, so stopping this one process stops the cluster it started."""
    token = secrets.token_hex(16)
    gcs, dashboard, agent_http, agent_grpc, runtime_env = (free_port() for _ in range(5))
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1",
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                             f"--port={gcs}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                             "--node-ip-address=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}",
                             # own agent ports: another Ray on this machine (an embedded one) holds the defaults
                             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
                             f"--runtime-env-agent-port={runtime_env}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
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
    yield address, env
    os.killpg(head.pid, signal.SIGTERM)  # --block: the head tears down every process it started
    try:
        head.wait(timeout=5)
    except subprocess.TimeoutExpired:  # Ray's graceful teardown can take half a minute; its processes share the group
        os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=30)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gcs), timeout=1).close()


def test_submit_runs_a_training_job_to_success(cluster, data_cache, tmp_path):
    address, env = cluster
    job_args = ["--", sys.executable, "-m", "rung.cli", "train", "tiny", "--set", "train.steps=5",
                "--set", "train.warmup_steps=1", "--set", f"out_dir={tmp_path}", "--set", f"data.cache_dir={data_cache}"]
    result = rung("submit", "--address", address, "--submission-id", "rung-test-1", *job_args, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted job rung-test-1" in result.stdout and "SUCCEEDED" in result.stdout
    status = rung("jobs", "status", "rung-test-1", "--address", address, env=env)
    assert status.stdout.strip() == "SUCCEEDED"
    logs = rung("jobs", "logs", "rung-test-1", "--address", address, env=env)
    assert "train: done" in logs.stdout
    listed = rung("jobs", "list", "--address", address, env=env)
    assert "rung-test-1\tSUCCEEDED" in listed.stdout


def test_wrong_token_is_refused(cluster):
    address, env = cluster
    result = rung("jobs", "list", "--address", address, env={**env, "RAY_AUTH_TOKEN": "0" * 32})
    assert_clean_failure(result)
    assert "401" in result.stderr or "nauthori" in result.stderr or "token" in result.stderr.lower()


def test_unknown_job_and_unreachable_address(cluster):
    address, env = cluster
    assert_clean_failure(rung("jobs", "status", "no-such-job", "--address", address, env=env), "no-such-job")
    started = time.monotonic()
    assert_clean_failure(rung("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", env=env),
                         "cannot reach")
    assert time.monotonic() - started < 30
