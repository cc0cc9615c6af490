"""Periodic progress lines with rate and ETA, for every long-running rung job."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    seconds = max(int(seconds + 0.5), 0)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """Formats `done/total`, a rate in `unit`/s and the ETA. `start` is where a resumed job picked up: the ETA
    extrapolates from the work done since then."""

    def __init__(self, label: str, total: int, unit: str, start: int = 0):
        self.label, self.total, self.unit, self.start = label, total, unit, start
        self.started = time.perf_counter()

    def line(self, done: int, amount: float, extra: str = "") -> str:
        """`amount` of `unit` processed since start, for the rate."""
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        eta = elapsed / max(done - self.start, 1) * (self.total - done)
        rate = amount / elapsed
        return (f"{self.label} {done}/{self.total} {extra}{rate:,.{0 if rate >= 10 else 2}f} {self.unit}/s "
                f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}")
