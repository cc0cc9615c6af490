"""The same OpenAI API as a Ray Serve application: each replica builds rung's FastAPI app (its own engine on one
model copy) and Ray Serve's proxy spreads requests over replicas, autoscaling on ongoing requests per replica.

`rung serve MODEL_DIR --ray` runs it on a local or remote Ray; for `serve deploy` / a KubeRay RayService the import
path is `rung.serving.ray_app:build` with args {model_dir, served_model_name, api_key, ...} (see
rung/serving/serve_config.yaml).
"""

from __future__ import annotations

from typing import Any

from ray import serve

from rung.serving.serve import PLACEMENT_ARGS
from rung.serving.server import ServeConfig, create_app, serve_config


def _app_for(config: ServeConfig):
    from rung.platform.runtime import configure_process

    configure_process()
    return create_app(config)


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder Ray Serve calls with the config's `args`."""
    config = serve_config({k: v for k, v in args.items() if k not in PLACEMENT_ARGS})
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": args.get("num_cpus", 1),
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
