"""`rung serve`: check the port, load the model, run the app under uvicorn, and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time

from rung.errors import RungError
from rung.serving.server import ServeConfig, create_app, serve_config

PLACEMENT_ARGS = ("num_replicas", "autoscaling", "num_cpus", "num_gpus")  # Ray Serve's, not the engine's


def check_port(host: str, port: int) -> None:
    """Fail before the (slow) model load when the address is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            reason = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
            raise RungError(f"port {port} on {host} {reason}; choose another with --port") from None


def _checked(settings: dict, host: str, port: int) -> ServeConfig:
    """Settings → ServeConfig, failing fast (before any model loads) on a taken port or a missing folder."""
    if not os.path.isdir(settings["model_dir"]):
        raise RungError(f"model folder not found: {settings['model_dir']}")
    check_port(host, port)
    config = serve_config({k: v for k, v in settings.items() if k not in PLACEMENT_ARGS})
    if config.backend == "vllm":
        from rung.serving.vllm_engine import import_vllm

        import_vllm()
    return config


def serve(settings: dict, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    import uvicorn

    from rung.platform.runtime import configure_process

    config = _checked(settings, host, port)
    configure_process()
    started = time.monotonic()
    app = create_app(config)
    state = app.state.rung

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: stop being ready, refuse new work with 503, let in-flight requests finish
        (up to the grace period), then shut down. A second signal exits at once."""

        def handle_exit(self, sig, frame) -> None:
            if state.draining:
                return super().handle_exit(sig, frame)
            state.draining = True
            print(f"serve: draining ({state.engine.num_unfinished} requests in flight, grace "
                  f"{config.grace_seconds:g} s)", flush=True)
            asyncio.get_event_loop().call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

        async def _drain(self) -> None:
            deadline = time.monotonic() + config.grace_seconds
            while state.engine.num_unfinished and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            self.should_exit = True

    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=int(config.grace_seconds) + 1))
    url = f"http://{host}:{port}"
    print(f"serve: {config.model_name} loaded in {time.monotonic() - started:.1f} s "
          f"({state.engine.describe()}); "
          f"OpenAI API at {url}/v1, metrics at {url}/metrics", flush=True)
    server.run()


def serve_on_ray(settings: dict, host: str = "127.0.0.1", port: int = 8000, address: str | None = None) -> None:
    """The same API as a Ray Serve application on the cluster at `address` (default: an embedded local Ray); runs
    until SIGTERM/Ctrl-C, then deletes the application."""
    import signal

    from ray import serve as ray_serve
    from ray.exceptions import RayError

    from rung.platform import cluster
    from rung.serving.ray_app import build

    config = _checked(settings, host, port)
    cluster.connect(address)
    stopping = []  # SIGTERM from here on (Ray installs its own handler at connect) means: delete the app, exit 0
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    replicas = settings.get("autoscaling") or settings.get("num_replicas", 1)
    try:
        ray_serve.start(http_options={"host": host, "port": port})
        ray_serve.run(build(settings), name="rung", route_prefix="/")
    except RayError as err:  # a proxy or replica that died starting: say which, without Ray's traceback
        raise RungError(f"Ray Serve could not start the application: {' '.join(str(err).split())[:300]}") from None
    url = f"http://{host}:{port}"
    print(f"serve: {config.model_name} on Ray Serve ({'autoscaling ' if settings.get('autoscaling') else ''}"
          f"replicas: {replicas}); OpenAI API at {url}/v1, metrics at {url}/metrics (per replica)", flush=True)
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    print("serve: shutting down the Ray Serve application", flush=True)
    ray_serve.delete("rung")
    ray_serve.shutdown()
