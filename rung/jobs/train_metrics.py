"""Training metrics: the one place their names are declared (rung_train_*), exported per worker to Prometheus.

Each worker serves its own registry on `metrics_port + local rank` (one port per worker on a machine, the same
port on every node, so a PodMonitor can name it) and Prometheus scrapes every rank;
`rank` is a label so dashboards can aggregate. Names follow Prometheus conventions: base units, `_total` counters.
"""

from __future__ import annotations

import errno
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from rung.errors import RungError


class TrainMetrics:
    def __init__(self, rank: int):
        self.registry = CollectorRegistry()
        labels = {"rank": str(rank)}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r).labels(**labels)

        self.loss = gauge("rung_train_loss", "Cross-entropy of the last optimizer step.")
        self.learning_rate = gauge("rung_train_learning_rate", "Base learning rate after the schedule.")
        self.grad_norm = gauge("rung_train_grad_norm", "Global gradient norm of the last step (NaN if not computed).")
        self.step = gauge("rung_train_step", "Optimizer steps completed.")
        self.step_seconds = gauge("rung_train_step_duration_seconds", "Wall time of the last optimizer step.")
        self.tokens_per_second = gauge("rung_train_tokens_per_second", "Tokens per second across all workers.")
        self.worker_tokens_per_second = gauge("rung_train_worker_tokens_per_second", "Tokens per second, this worker.")
        self.mfu = gauge("rung_train_mfu_ratio", "Model FLOPs utilisation of this worker (0-1).")
        self.moe_dropped = gauge("rung_train_moe_dropped_fraction", "Share of token-expert assignments dropped.")
        self.moe_imbalance = gauge("rung_train_moe_load_imbalance_ratio",
                                   "Busiest expert's load over the mean load (1 = balanced).")
        self.checkpoint_seconds = gauge("rung_train_checkpoint_save_duration_seconds", "Time to save the last checkpoint.")
        self.checkpoint_time = gauge("rung_train_checkpoint_timestamp_seconds",
                                     "Unix time of the last successful checkpoint, or of the worker's start before "
                                     "the first (its age: time() minus this).")
        self.checkpoint_time.set_to_current_time()
        self.tokens = Counter("rung_train_tokens", "Tokens trained on by this worker.", list(labels),
                              registry=r).labels(**labels)

    def record(self, row, world_size: int, mfu: float) -> None:
        """Publish one optimizer step (a rung.jobs.train.StepMetrics)."""
        self.loss.set(row.loss)
        self.learning_rate.set(row.lr)
        self.grad_norm.set(row.grad_norm)
        self.step.set(row.step)
        self.step_seconds.set(row.seconds)
        self.tokens_per_second.set(row.tokens / row.seconds)
        self.worker_tokens_per_second.set(row.tokens / world_size / row.seconds)
        self.mfu.set(mfu)
        self.moe_dropped.set(row.moe_dropped_fraction)
        self.moe_imbalance.set(row.moe_load_imbalance)
        self.tokens.inc(row.tokens // world_size)

    def serve(self, port: int, host: str, wait_seconds: float = 30.0) -> None:
        """Serve the registry; a port still in use is retried for `wait_seconds`, because after a failure the
        restarted worker group can start while the old group's survivors are still being torn down and hold it."""
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                start_http_server(port, addr=host, registry=self.registry)
                return
            except OSError as err:
                if err.errno == errno.EADDRINUSE and time.monotonic() < deadline:
                    time.sleep(0.5)
                    continue
                raise RungError(f"cannot serve training metrics on {host}:{port} (train.metrics_port + local rank): "
                                f"{err.strerror or err}") from None
