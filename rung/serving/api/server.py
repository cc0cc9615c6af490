"""`rung serve`: check the folder and the port, load the model, run the app under uvicorn, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time

from rung.errors import RungError
from rung.serving.api.app import create_app
from rung.serving.config import ServeConfig

CUT_OFF_FLUSH_SECONDS = 1  # after the grace period: time for the cut-off responses to reach their clients


def check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when the address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as err:
            reason = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
            raise RungError(f"port {port} on {host} {reason}; choose another with --port") from None


def check_serveable(config: ServeConfig, host: str, port: int) -> None:
    """Fail fast, before any model loads, on a missing folder, a taken port or a backend that cannot load."""
    if not os.path.isdir(config.model_dir):
        raise RungError(f"model folder not found: {config.model_dir}")
    check_port(host, port)
    if config.backend == "rung":  # the config first: a broken one is named as such, not as a tokenizer problem
        from rung.serving.worker.model_spec import load_spec

        load_spec(config.model_dir)
    if config.backend == "vllm":
        from rung.serving.backends.vllm import import_vllm

        import_vllm()


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    import uvicorn

    from rung.platform.runtime import configure_process

    check_serveable(config, host, port)
    if config.engine.deterministic and not config.engine.enable_prefix_caching:
        print("serve: --deterministic already turns prefix caching off; --no-prefix-caching changes nothing",
              flush=True)
    configure_process()
    started = time.monotonic()
    app = create_app(config)
    state = app.state.rung

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: stop being ready, refuse new work with 503, and let in-flight requests finish
        within the grace period — one clock from the signal. At its end whatever is still running is cut off:
        streams get an error event and [DONE], other requests a 503 envelope, and the process exits. A second
        signal cuts off what is left at once."""

        def handle_exit(self, sig, frame) -> None:
            if state.draining:
                print("serve: second signal; cutting off what is left and exiting now", flush=True)
                hurry.set()
                return
            state.draining = True
            print(f"serve: draining ({state.engine.num_unfinished} requests in flight, grace "
                  f"{config.grace_seconds:g} s)", flush=True)
            asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            deadline = time.monotonic() + config.grace_seconds
            while state.engine.num_unfinished and time.monotonic() < deadline and not hurry.is_set():
                await asyncio.sleep(0.05)
            if state.open_requests:
                print(f"serve: cutting off {len(state.open_requests)} requests", flush=True)
                why = "a second signal" if hurry.is_set() else f"its grace period of {config.grace_seconds:g} s is over"
                state.open_requests.cut_off(f"the server shut down before this request finished ({why})")
                flushed = time.monotonic() + CUT_OFF_FLUSH_SECONDS
                while state.open_requests and time.monotonic() < flushed:
                    await asyncio.sleep(0.02)
            self.should_exit = True

    hurry = threading.Event()  # a second signal: end the drain now
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=CUT_OFF_FLUSH_SECONDS))
    url = f"http://{host}:{port}"
    print(f"serve: {config.model_name} loaded in {time.monotonic() - started:.1f} s "
          f"({state.engine.describe()}); "
          f"OpenAI API at {url}/v1, metrics at {url}/metrics", flush=True)
    server.run()
