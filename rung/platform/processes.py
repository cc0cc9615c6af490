"""Waiting for a service process (Prometheus, a server) to answer before using it."""

from __future__ import annotations

import subprocess
import time
import urllib.request

from rung.errors import RungError


def wait_until_ready(process: subprocess.Popen, url: str, seconds: float, name: str) -> subprocess.Popen:
    """Return `process` once GET `url` succeeds; RungError (and the process killed) if it exits or times out."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RungError(f"{name} exited with status {process.returncode} before it was ready")
        try:
            urllib.request.urlopen(url, timeout=2)
            return process
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise RungError(f"{name} did not become ready within {seconds:g} s")
