"""Where the engine's steps run for the server: on a thread of the server's process, or in a process of its own.

The step loop is the same either way: take the messages that arrived (AddRequest, AbortRequest), step the Engine,
report the step's tokens and stats as one StepReport (`messages.py`). Only the transport differs:

    ThreadCore:   asyncio ─ deque ─► compute thread ─ call_soon_threadsafe ─► asyncio
    ProcessCore:  asyncio ─ pipe ─► engine process ─ pipe ─► reader thread ─ call_soon_threadsafe ─► asyncio

`rung serve` uses a ProcessCore (as vLLM runs its engine core in its own process): in one process the HTTP side's
parsing, tokenization, detokenization and SSE writing hold the GIL that the model's operator dispatch also needs,
which measurably stalled the compute thread under 64 concurrent streams. A ThreadCore serves an Engine built by the
caller (benchmarks, tests).
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from rung.errors import ConfigError, RungError
from rung.serving.config import EngineConfig
from rung.serving.engine.engine import Engine
from rung.serving.engine.messages import (AbortRequest, AddRequest, EngineFailed, EngineReady, LoadFailed,
                                          ProtocolError, Shutdown, StepReport, dispatch)

log = logging.getLogger(__name__)
IDLE_WAIT_SECONDS = 0.05  # how long an idle loop waits for a message before looking again

ToEngine = AddRequest | AbortRequest | Shutdown


def run_steps(engine: Engine, receive: Callable[[float], list[ToEngine]], report: Callable[[StepReport], None],
              stopping: Callable[[], bool]) -> None:
    """Steps `engine` until `stopping()` (or a Shutdown arrives). `receive(timeout)` returns the messages that
    arrived, waiting up to `timeout` seconds for the first. An idle engine reports once (empty events), so the
    server's gauges fall back to zero. A message of another type raises ProtocolError."""
    idle_reported, shutdown = False, False

    def stop(_message: Shutdown) -> None:
        nonlocal shutdown
        shutdown = True

    handlers = {AddRequest: lambda m: engine.add(m.request_id, m.prompt_token_ids, m.params, m.priority),
                AbortRequest: lambda m: engine.abort(m.request_id, m.status), Shutdown: stop}
    while not stopping() and not shutdown:
        engine.check_health()
        for message in receive(0.0 if engine.has_work else IDLE_WAIT_SECONDS):
            dispatch(message, handlers)
        if engine.has_work:
            started = time.monotonic()
            events = engine.step()
            report(StepReport(events, started, time.monotonic() - started, engine.last_step_tokens,
                              engine.model.last_nano_batches, engine.stats()))
            idle_reported = False
        elif not idle_reported:
            report(StepReport([], time.monotonic(), 0.0, 0, 0, engine.stats()))
            idle_reported = True


class ThreadCore:
    """The step loop on a thread of this process, over an Engine the caller built."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.limits = engine.limits
        self.place = "on a compute thread"
        self._inbox: deque[ToEngine] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self, on_report: Callable[[StepReport], None], on_failure: Callable[[str], None]) -> None:
        def loop() -> None:
            try:
                run_steps(self.engine, self._receive, on_report, lambda: self._stopping)
            except Exception as err:  # noqa: BLE001 - the server answers 503 and /health fails
                log.exception("the engine failed")
                on_failure(f"the engine failed: {err}")

        self._thread = threading.Thread(target=loop, name="rung-compute", daemon=True)
        self._thread.start()

    def _receive(self, timeout: float) -> list[ToEngine]:
        if not self._inbox and timeout:
            self._wake.wait(timeout)
        self._wake.clear()
        messages = []
        while self._inbox:
            messages.append(self._inbox.popleft())
        return messages

    def send(self, message: ToEngine) -> None:
        self._inbox.append(message)
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def _engine_process(model_dir: str, config: EngineConfig, conn) -> None:
    """The engine process: build the Engine, say EngineReady (or LoadFailed), then step until told to stop or the
    server goes away (its end of the pipe closes). Ctrl-C reaches the whole process group: the server drains, then
    stops this process, so it ignores SIGINT."""
    from rung.platform.runtime import configure_process

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_process()
    try:
        engine = Engine(model_dir, config)
    except ConfigError as err:
        conn.send(LoadFailed(err.message, err.field))
        return
    except RungError as err:
        conn.send(LoadFailed(str(err)))
        return
    conn.send(EngineReady(engine.limits))
    gone = False

    def receive(timeout: float) -> list[ToEngine]:
        nonlocal gone
        messages = []
        try:
            if conn.poll(timeout):
                while conn.poll():
                    messages.append(conn.recv())
        except (EOFError, OSError):
            gone = True
        return messages

    try:
        run_steps(engine, receive, conn.send, lambda: gone)
    except (EOFError, OSError, BrokenPipeError):
        pass  # the server went away
    except Exception as err:  # noqa: BLE001 - reported to the server, which answers 503
        log.exception("the engine failed")
        conn.send(EngineFailed(f"the engine failed: {err}"))
    finally:
        engine.close()


class ProcessCore:
    """The step loop in a process of its own (spawned: torch and threads do not survive a fork). Building it
    blocks until the engine has loaded, so a bad model folder fails here with the engine's own message."""

    def __init__(self, model_dir: str | Path, config: EngineConfig):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_engine_process, args=(str(model_dir), config, child),
                                        name="rung-engine", daemon=True)
        self._process.start()
        child.close()
        try:
            first = self._conn.recv()
        except EOFError:
            self._process.join(timeout=5)
            raise RungError(f"the engine process exited (code {self._process.exitcode}) while loading "
                            f"{model_dir}") from None
        if isinstance(first, LoadFailed):
            self._process.join(timeout=5)
            raise RungError(first.reason) if first.field is None else ConfigError(first.field, first.reason)
        self.limits = dispatch(first, {EngineReady: lambda m: m.limits})
        self.place = "in its own process"
        self._reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self._stopping = False

    def start(self, on_report: Callable[[StepReport], None], on_failure: Callable[[str], None]) -> None:
        handlers = {StepReport: on_report, EngineFailed: lambda m: on_failure(m.reason)}

        def read() -> None:
            while True:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    if not self._stopping:
                        on_failure(f"the engine process stopped (exit code {self._process.exitcode})")
                    return
                try:
                    dispatch(message, handlers)
                except ProtocolError as err:  # a bug: stop serving loudly rather than guess
                    log.error("%s", err)
                    on_failure(str(err))
                    return

        self._reader = threading.Thread(target=read, name="rung-engine-reader", daemon=True)
        self._reader.start()

    def send(self, message: ToEngine) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except (OSError, BrokenPipeError):
                pass  # the process is gone; the reader reports the failure

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self.send(Shutdown())
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)
        self._conn.close()
