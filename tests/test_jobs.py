"""`rung submit` / `rung jobs` against a real `ray start --head` cluster on 127.0.0.1 with token authentication."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, assert_clean_failure, free_port, ray_head


def rung(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rung.cli", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster():
    """(the Jobs API address, a client environment holding the token, the GCS address)."""
    with ray_head() as head:
        yield head.dashboard, {**os.environ, **head.env, "OMP_NUM_THREADS": "1"}, head.gcs


def test_submit_runs_a_training_job_to_success(cluster, data_cache, tmp_path):
    address, env, _ = cluster
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


def test_wrong_token_is_refused(cluster, tmp_path):
    address, env, gcs = cluster
    result = rung("jobs", "list", "--address", address, env={**env, "RAY_AUTH_TOKEN": "0" * 32})
    assert_clean_failure(result)
    assert "401" in result.stderr or "nauthori" in result.stderr or "token" in result.stderr.lower()
    # joining the cluster to train without its token (Ray retries for 2 s here, 20 by default): a message
    result = rung("train", "tiny", "--workers", "2", "--address", gcs, "--set", f"out_dir={tmp_path}",
                  env={**env, "RAY_AUTH_MODE": "disabled", "RAY_gcs_server_port_wait_time_s": "2"})
    assert_clean_failure(result, f"cannot join the Ray cluster at {gcs}", "RAY_AUTH_TOKEN")
    assert not any(tmp_path.iterdir())


def test_unknown_job_and_unreachable_address(cluster):
    address, env, _ = cluster
    assert_clean_failure(rung("jobs", "status", "no-such-job", "--address", address, env=env), "no-such-job")
    started = time.monotonic()
    assert_clean_failure(rung("jobs", "list", "--address", f"http://127.0.0.1:{free_port()}", env=env),
                         "cannot reach")
    assert time.monotonic() - started < 30
