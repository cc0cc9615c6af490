"""Training metrics: the one place their names are declared (rung_train_*), exported per worker to Prometheus, and
the metrics logger that publishes every step to Prometheus, RUN_DIR/metrics.jsonl and the console.

Each worker serves its own registry on `metrics_port + local rank` (one port per worker on a machine, the same
port on every node, so a PodMonitor can name it) and Prometheus scrapes every rank;
`rank` is a label so dashboards can aggregate. Names follow Prometheus conventions: base units, `_total` counters.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from rung.errors import RungError
from rung.jobs.config import RunConfig
from rung.jobs.model.counting import count
from rung.platform.progress import Progress
from rung.jobs.run_dir import RunDir
from rung.jobs.train.step import StepMetrics
from rung.platform import runtime


class TrainMetrics:
    def __init__(self, rank: int):
        self.registry = CollectorRegistry()
        labels = {"rank": str(rank)}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, list(labels), registry=r).labels(**labels)

        self.loss = gauge("rung_train_loss", "Cross-entropy of the last optimizer step.")
        self.learning_rate = gauge("rung_train_learning_rate", "Base learning rate after the schedule.")
        self.grad_norm = gauge("rung_train_grad_norm", "Global gradient norm of the last step, before clipping.")
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
        self.data_seconds = gauge("rung_train_data_loading_duration_seconds",
                                  "Time the last optimizer step spent building its batch.")
        self.peak_memory = gauge("rung_train_peak_memory_bytes",
                                 "This worker's peak memory: CUDA allocations on a GPU, resident set on a CPU.")
        self.validation_loss = gauge("rung_train_validation_loss", "Cross-entropy on the held-out validation split "
                                     "at the last evaluation (train.eval_every steps and the last step).")
        self.group_learning_rate = Gauge("rung_train_group_learning_rate", "Learning rate of each parametrization "
                                         "group after the schedule.", [*labels, "group"], registry=r)
        self._rank = labels["rank"]
        self.tokens = Counter("rung_train_tokens", "Tokens trained on by this worker.", list(labels),
                              registry=r).labels(**labels)

    def record(self, row: StepMetrics, world_size: int, mfu: float) -> None:
        """Publish one optimizer step."""
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
        self.data_seconds.set(row.data_seconds)
        self.peak_memory.set(row.peak_memory_bytes)
        if row.val_loss is not None:
            self.validation_loss.set(row.val_loss)
        for group, lr in row.group_lrs.items():
            self.group_learning_rate.labels(rank=self._rank, group=group).set(lr)

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


def read_metrics(run_dir: RunDir) -> list[dict]:
    """The run's per-step rows (the last write of each step wins, as after a restart)."""
    rows = {}
    for line in run_dir.metrics.read_text().splitlines() if run_dir.metrics.is_file() else []:
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[step] for step in sorted(rows)]


def keep_metrics_until(run_dir: RunDir, step: int) -> None:
    """After a resume at `step`, drop the rows a failed attempt wrote past it, so each step appears once."""
    if run_dir.metrics.is_file():
        kept = [json.dumps(row) for row in read_metrics(run_dir) if row["step"] <= step]
        run_dir.metrics.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    """Every step to Prometheus (each worker), metrics.jsonl (rank 0) and, every `train.log_every` steps and at
    every evaluation, one console line with loss, validation loss, LR, MFU, data time, peak memory, rate and
    ETA. MFU divides the counted FLOPs by `train.peak_flops`, the datasheet peak of a known GPU, or a measured CPU
    matmul rate."""

    def __init__(self, run_dir: RunDir, cfg: RunConfig, rank: int, world_size: int, start: int, say):
        self.cfg, self.world_size, self.say = cfg, world_size, say
        self.prometheus = TrainMetrics(rank)
        if cfg.train.metrics_port is not None:
            # + the local rank: every node's first worker on the same port, so a PodMonitor can name it
            self.prometheus.serve(cfg.train.metrics_port + int(os.environ.get("LOCAL_RANK", rank)),
                                  runtime.listen_host())
        self.flops_per_token = count(cfg.model, cfg.train.seq_len).flops_per_token
        self.peak_flops = cfg.train.peak_flops or runtime.peak_flops(cfg.train.dtype)
        self.progress = Progress("step", cfg.train.steps, "tok", start=start)
        self.trained = 0
        self._jsonl = run_dir.metrics.open("a") if rank == 0 else None

    def record(self, row: StepMetrics) -> None:
        self.trained += row.tokens
        mfu = self.flops_per_token * row.tokens / self.world_size / row.seconds / self.peak_flops
        self.prometheus.record(row, self.world_size, mfu)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(asdict(row)) + "\n")
            self._jsonl.flush()
        if row.step % self.cfg.train.log_every == 0 or row.step == self.cfg.train.steps or row.val_loss is not None:
            val = f"val {row.val_loss:.4f} " if row.val_loss is not None else ""
            self.say(self.progress.line(row.step, self.trained, f"loss {row.loss:.4f} {val}lr {row.lr:.2e} "
                                        f"mfu {mfu:.1%} data {row.data_seconds * 1000:.1f} ms "
                                        f"peak {row.peak_memory_bytes / (1 << 20):,.0f} MiB "))

    def checkpoint(self, path, seconds: float) -> None:
        self.prometheus.checkpoint_seconds.set(seconds)
        self.prometheus.checkpoint_time.set_to_current_time()
        if path is not None:
            self.say(f"train: checkpoint {path} ({seconds:.2f} s)")

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
