"""Connect to Ray: an embedded single-machine cluster by default, or an existing cluster by address.

The embedded cluster keeps every listener on 127.0.0.1 — Ray otherwise advertises (and binds) the machine's
external address, and this must be decided before `ray` is first imported, so this module sets it up front and
must be imported before anything imports ray. A cluster address is checked for reachability first, so a wrong
address fails in seconds instead of hanging.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import urlparse

from rung.errors import ConfigError, RungError

_EMBEDDED = not (os.environ.get("RAY_ADDRESS") or os.environ.get("RUNG_CLUSTER") == "1")
if _EMBEDDED:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray then uses the loopback address
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402


@dataclass(frozen=True, slots=True)
class Cluster:
    address: str | None  # None: embedded in this process
    cpus: float
    gpus: float

    @property
    def embedded(self) -> bool:
        return self.address is None


def connect(address: str | None = None, num_cpus: int | None = None) -> Cluster:
    """Start (or join) Ray. `address` falls back to RAY_ADDRESS; neither means an embedded local cluster."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        if address is None:
            # The dashboard serves the State API that Ray Train's controller monitoring polls; loopback only.
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=True,
                     dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", configure_logging=False,
                     log_to_driver=True)
        else:
            check_reachable(address)
            try:
                ray.init(address=address, configure_logging=False, log_to_driver=True)
            except (ConnectionError, RuntimeError) as err:
                detail = str(err.__cause__ or err)
                reason = ("it refused this client's authentication token: set RAY_AUTH_MODE=token and the cluster's "
                          "token in RAY_AUTH_TOKEN" if "AuthenticationError" in detail else detail.splitlines()[0])
                raise RungError(f"cannot join the Ray cluster at {address}: {reason}") from None
    resources = ray.cluster_resources()
    return Cluster(address=address, cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0))


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when nothing listens at a Ray address (host:port, ray://, http://)."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise ConfigError("--address", f"{address!r} is not HOST:PORT, ray://HOST:PORT or http://HOST:PORT")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as err:
        raise RungError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def check_capacity(cluster: Cluster, workers: int, use_gpu: bool) -> None:
    """Refuse a worker group the cluster can never place, instead of waiting for resources forever."""
    if workers > cluster.cpus:
        raise ConfigError("train.workers", f"{workers} workers need {workers} CPUs; the Ray cluster has "
                          f"{cluster.cpus:g}")
    if use_gpu and workers > cluster.gpus:
        raise ConfigError("train.use_gpu", f"{workers} workers need {workers} GPUs; the Ray cluster has "
                          f"{cluster.gpus:g}")


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()
