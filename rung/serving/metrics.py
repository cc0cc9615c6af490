"""Serving metrics: every `rung_serve_*` name is declared here and nowhere else (dashboards and alert rules are
checked against this module). Each server owns a registry; every series carries `model_name`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class ServeMetrics:
    def __init__(self, model_name: str, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]
        counter = partial(Counter, labelnames=labels, registry=self.registry)
        gauge = partial(Gauge, labelnames=labels, registry=self.registry)
        histogram = partial(Histogram, labelnames=labels, registry=self.registry)

        self.requests_running = gauge("rung_serve_requests_running", "Requests in the running batch.")
        self.requests_waiting = gauge("rung_serve_requests_waiting", "Requests admitted but not yet running.")
        self.kv_cache_usage = gauge("rung_serve_kv_cache_usage_ratio", "Fraction of KV blocks held by requests.")
        self.queue_limit = gauge("rung_serve_requests_waiting_limit",
                                 "Waiting requests beyond which new ones get 429 (--max-queued-requests).")
        self.compute_busy = gauge("rung_serve_compute_busy_ratio",
                                  "Fraction of the last second the engine spent in steps (its thread or process).")
        self.prefix_queries = counter("rung_serve_prefix_cache_queries_total", "KV blocks looked up in the prefix "
                                      "cache.")
        self.prefix_hits = counter("rung_serve_prefix_cache_hits_total", "KV blocks found in the prefix cache.")
        self.prompt_tokens = counter("rung_serve_prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = counter("rung_serve_generation_tokens_total", "Tokens generated.")
        self.preemptions = counter("rung_serve_preemptions_total", "Requests preempted for KV blocks.")
        self.request_outcomes = counter("rung_serve_request_success_total", "Finished requests by finish reason.",
                                        labelnames=[*labels, "finish_reason"])
        self.http_requests = counter("rung_serve_http_requests_total", "HTTP responses by route and status code.",
                                     labelnames=[*labels, "route", "status"])
        latency = partial(histogram, buckets=LATENCY_BUCKETS)
        tokens = partial(histogram, buckets=TOKEN_BUCKETS)
        self.ttft = latency("rung_serve_time_to_first_token_seconds", "Arrival to first generated token.")
        self.itl = latency("rung_serve_inter_token_latency_seconds", "Time between consecutive tokens.")
        self.e2e = latency("rung_serve_e2e_request_latency_seconds", "Arrival to the request's last token.")
        self.queue_time = latency("rung_serve_request_queue_time_seconds",
                                  "Arrival to the start of the step that produced the first token.")
        self.step_time = latency("rung_serve_engine_step_seconds", "Wall time of one engine step.")
        self.prompt_length = tokens("rung_serve_request_prompt_tokens", "Prompt length of finished requests.")
        self.generation_length = tokens("rung_serve_request_generation_tokens", "Output length of finished "
                                        "requests.")
        self.step_tokens = tokens("rung_serve_engine_step_tokens", "Tokens computed by one engine step.")
        self.nano_batches = histogram("rung_serve_engine_step_nano_batches", "Nano-batches one step was split into.",
                                      buckets=(1, 2, 3, 4, 6, 8))
        self.model_info = Gauge("rung_serve_model_info", "1 for the served model, labelled with how its weights are "
                                "held.", labelnames=[*labels, "dtype", "quantization"], registry=self.registry)
        self._last = {"queries": 0, "hits": 0, "preemptions": 0}
        # every series exists from the start (at zero), so dashboards and alerts see them before the first event
        for metric in (self.requests_running, self.requests_waiting, self.kv_cache_usage, self.compute_busy,
                       self.prefix_queries, self.prefix_hits, self.prompt_tokens, self.generation_tokens,
                       self.preemptions, self.ttft, self.itl, self.e2e, self.queue_time, self.step_time,
                       self.prompt_length, self.generation_length, self.step_tokens, self.nano_batches):
            self.labels(metric)
        for reason in ("stop", "length", "abort"):
            self.labels(self.request_outcomes, finish_reason=reason)

    def describe_model(self, dtype: str, quantization: str) -> None:
        self.labels(self.model_info, dtype=dtype, quantization=quantization).set(1)

    def labels(self, metric, **labels):
        return metric.labels(model_name=self.model_name, **labels)

    def observe_engine(self, running: int, waiting: int, kv_usage: float, prefix_queries: int, prefix_hits: int,
                       preemptions: int) -> None:
        """Gauges from the engine's state and counters from its running totals (added as deltas)."""
        self.labels(self.requests_running).set(running)
        self.labels(self.requests_waiting).set(waiting)
        self.labels(self.kv_cache_usage).set(kv_usage)
        for key, metric, total in (("queries", self.prefix_queries, prefix_queries),
                                   ("hits", self.prefix_hits, prefix_hits),
                                   ("preemptions", self.preemptions, preemptions)):
            if total > self._last[key]:
                self.labels(metric).inc(total - self._last[key])
                self._last[key] = total


@dataclass
class RequestClock:
    """One request's latency metrics as its tokens arrive: queue time and time to first token at the first,
    inter-token latency after, end-to-end latency, lengths and outcome at the finish. Both backends keep one per
    request, so `rung_serve_*` means the same whichever engine serves."""

    metrics: ServeMetrics | None
    prompt_tokens: int
    arrival: float = field(default_factory=time.monotonic)
    last_token: float | None = None

    def token(self, scheduled: float | None = None) -> None:
        """A token reached the server; `scheduled`: when the step that made it started, if known."""
        now, m = time.monotonic(), self.metrics
        if m:
            if self.last_token is None:
                m.labels(m.ttft).observe(now - self.arrival)
                if scheduled is not None:
                    m.labels(m.queue_time).observe(max(scheduled - self.arrival, 0.0))
            else:
                m.labels(m.itl).observe(now - self.last_token)
            m.labels(m.generation_tokens).inc()
        self.last_token = now

    def finish(self, reason: str, output_tokens: int) -> None:
        m = self.metrics
        if not m:
            return
        m.labels(m.request_outcomes, finish_reason=reason).inc()
        m.labels(m.prompt_tokens).inc(self.prompt_tokens)
        m.labels(m.prompt_length).observe(self.prompt_tokens)
        m.labels(m.generation_length).observe(output_tokens)
        m.labels(m.e2e).observe(time.monotonic() - self.arrival)
