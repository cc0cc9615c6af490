"""The same OpenAI API as a Ray Serve application: each replica builds rung's FastAPI app (its own engine on one
model copy) and Ray Serve's proxy spreads requests over replicas, autoscaling on ongoing requests per replica.

`rung serve MODEL_DIR --ray` runs it on a local or remote Ray (`serve_on_ray`); for `serve deploy` / a KubeRay
RayService the import path is `rung.serving.deploy.ray_app:build` with args {model_dir, served_model_name, api_key,
...} (see rung/serving/deploy/serve_config.yaml).
"""

from __future__ import annotations

import signal
import time
from typing import Any

from rung.errors import RungError
from rung.platform import cluster  # first: it sets Ray's environment before anything imports ray
from rung.serving.api.app import create_app
from rung.serving.api.server import check_serveable
from rung.serving.config import ServeConfig, serve_config

PLACEMENT_ARGS = ("num_replicas", "autoscaling", "num_cpus", "num_gpus")  # Ray Serve's, not the engine's


def _app_for(config: ServeConfig):
    from rung.platform.runtime import configure_process

    configure_process()
    return create_app(config)


def build(args: dict[str, Any]):
    """The application builder Ray Serve calls with the config's `args`: a bound Ray Serve application."""
    from ray import serve

    config = serve_config({k: v for k, v in args.items() if k not in PLACEMENT_ARGS})
    # a replica reserves a CPU per tensor-parallel rank unless told otherwise (its ranks run as its subprocesses)
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": args.get("num_cpus",
                                                                          config.engine.tensor_parallel_size),
                                                     "num_gpus": args.get("num_gpus", 0)},
                               "max_ongoing_requests": config.engine.max_num_seqs + config.max_queued_requests}
    autoscaling = args.get("autoscaling")
    if autoscaling:
        low, high = autoscaling
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": config.engine.max_num_seqs}
    else:
        options["num_replicas"] = args.get("num_replicas", 1)

    def app_builder():  # a plain function: Ray Serve calls it on each replica (a partial would be taken for an app)
        return _app_for(config)

    ingress = serve.ingress(app_builder)
    return serve.deployment(name="RungServer", **options)(ingress(type("RungServer", (), {}))).bind()


def serve_on_ray(settings: dict[str, Any], host: str = "127.0.0.1", port: int = 8000,
                 address: str | None = None) -> None:
    """The same API as a Ray Serve application on the cluster at `address` (default: an embedded local Ray);
    `settings` as `build` takes them. Runs until SIGTERM/Ctrl-C, then deletes the application."""
    from ray import serve
    from ray.exceptions import RayError

    config = serve_config({k: v for k, v in settings.items() if k not in PLACEMENT_ARGS})
    check_serveable(config, host, port)
    cluster.connect(address)
    stopping = []  # SIGTERM from here on (Ray installs its own handler at connect) means: delete the app, exit 0
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    replicas = settings.get("autoscaling") or settings.get("num_replicas", 1)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(settings), name="rung", route_prefix="/")
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
    serve.delete("rung")
    serve.shutdown()
