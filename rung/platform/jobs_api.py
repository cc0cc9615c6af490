"""Submit and manage rung jobs on a Ray cluster through Ray's Jobs API (the dashboard's HTTP endpoint).

With token authentication on (RAY_AUTH_MODE=token, the token in RAY_AUTH_TOKEN or ~/.ray/auth_token), Ray's client
sends the token with every request; rung passes nothing else.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from collections.abc import Callable

from rung.errors import RungError
from rung.platform.cluster import check_reachable  # first: sets Ray's environment before ray is imported

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
AGENT_WAIT_SECONDS = 180  # a head node's job agent can take minutes to come up on a busy machine
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        address = f"http://{address}"
    check_reachable(address)
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # connection and auth failures surface as assorted exceptions from Ray's client
        raise RungError(f"cannot use the Jobs API at {address}: {err}") from None


def submit(command: list[str], address: str | None, working_dir: str | None, env: dict[str, str],
           submission_id: str | None) -> tuple[object, str]:
    """Submit `command` as a job's entrypoint; returns (client, submission id)."""
    if not command:
        raise RungError("nothing to submit: give the job's command after --, e.g. rung submit -- rung train tiny")
    if working_dir is not None and not os.path.isdir(working_dir):
        raise RungError(f"--working-dir {working_dir} is not a directory")
    client = _client(address)
    runtime_env: dict = {"env_vars": {"OMP_NUM_THREADS": "1", **env}}
    if working_dir is not None:
        runtime_env["working_dir"] = working_dir
    deadline, waiting = time.monotonic() + AGENT_WAIT_SECONDS, False
    while True:
        try:
            job_id = client.submit_job(entrypoint=shlex.join(command), runtime_env=runtime_env,
                                       submission_id=submission_id)
            return client, job_id
        except RuntimeError as err:  # Ray's client reports HTTP errors as RuntimeError with the body
            # A cluster that has just started answers before its job agent is up: that one is worth waiting for.
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise RungError(f"the Jobs API refused the job: {err}") from None
            if not waiting:
                print("submit: the cluster's job agent is not up yet; retrying for up to "
                      f"{AGENT_WAIT_SECONDS} s", file=sys.stderr, flush=True)
                waiting = True
            time.sleep(2)


def follow(client, job_id: str, out: Callable[[str], None], poll: float = 1.0) -> str:
    """Stream a job's new log output until it ends; returns its final status."""
    shown = 0
    while True:
        try:
            status = str(client.get_job_status(job_id).value)
            logs = client.get_job_logs(job_id)
        except RuntimeError as err:
            raise RungError(f"lost track of job {job_id}: {err}") from None
        if len(logs) > shown:
            out(logs[shown:])
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll)


def status(address: str | None, job_id: str) -> str:
    return str(_call(address, "get_job_status", job_id).value)


def logs(address: str | None, job_id: str) -> str:
    return _call(address, "get_job_logs", job_id)


def stop(address: str | None, job_id: str) -> bool:
    return _call(address, "stop_job", job_id)


def list_jobs(address: str | None) -> list:
    try:
        return _client(address).list_jobs()
    except RuntimeError as err:
        raise RungError(f"cannot list jobs: {err}") from None


def _call(address: str | None, method: str, job_id: str):
    client = _client(address)
    try:
        return getattr(client, method)(job_id)
    except RuntimeError as err:  # Ray's client raises RuntimeError for unknown ids, with the HTTP body
        raise RungError(f"job {job_id}: {err}") from None
