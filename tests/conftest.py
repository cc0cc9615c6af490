"""Shared fixtures. Tests run real code: real tokenizers, real DeepSpeed engines, real subprocesses of `rung`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One data cache per test session, so the built-in corpus is tokenized once and reused by later tests."""
    return tmp_path_factory.mktemp("data-cache")


def run_rung(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `rung` command line in a fresh process, as a user would."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "rung.cli", *args], cwd=cwd or REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, a one-line message naming the problem, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr
