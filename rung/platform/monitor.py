"""A local Prometheus for rung (`make monitor`, and the dashboard tests): Debian's `prometheus` on 127.0.0.1,
scraping rung servers, training workers and Ray, with the alert rules of k8s/base/monitoring/prometheusrule.yaml.

    python -m rung.platform.monitor --rules k8s/base/monitoring/prometheusrule.yaml [--port 9090]
        [--serve 127.0.0.1:8000 ...] [--train 127.0.0.1:9400 ...]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from rung.errors import RungError
from rung.platform.processes import wait_until_ready

RAY_SERVICE_DISCOVERY = "/tmp/ray/prom_metrics_service_discovery.json"  # written by a running Ray head


def rules_from(prometheus_rule: Path) -> dict:
    """The rule groups of a PrometheusRule manifest, as a Prometheus rule file."""
    return yaml.safe_load(Path(prometheus_rule).read_text())["spec"]


def write_config(directory: Path, serve: list[str], train: list[str], rules: Path | None,
                 interval: str = "15s") -> Path:
    """prometheus.yml (and rules.yml) in `directory`; jobs are named as the k8s monitors name them."""
    directory.mkdir(parents=True, exist_ok=True)
    config: dict = {"global": {"scrape_interval": interval, "evaluation_interval": interval},
                    "scrape_configs": [
                        {"job_name": "rung-serve", "static_configs": [{"targets": serve}]},
                        {"job_name": "rung-train", "static_configs": [{"targets": train}]},
                        {"job_name": "ray", "file_sd_configs": [{"files": [RAY_SERVICE_DISCOVERY]}]}]}
    if rules is not None:
        (directory / "rules.yml").write_text(yaml.safe_dump(rules_from(rules)))
        config["rule_files"] = ["rules.yml"]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(directory: Path, port: int) -> subprocess.Popen:
    """Prometheus on 127.0.0.1:`port` with the config in `directory`; returns once it answers /-/ready."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RungError("prometheus is not installed (Debian: apt-get install prometheus)")
    process = subprocess.Popen([binary, f"--config.file={directory / 'prometheus.yml'}",
                                f"--storage.tsdb.path={directory / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                "--web.enable-lifecycle"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    return wait_until_ready(process, f"http://127.0.0.1:{port}/-/ready", 30, f"prometheus on port {port}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rules", type=Path, help="a PrometheusRule manifest whose groups Prometheus evaluates")
    parser.add_argument("--port", type=int, default=9090)
    parser.add_argument("--serve", action="append", default=[], help="a rung server to scrape (HOST:PORT)")
    parser.add_argument("--train", action="append", default=[], help="a training worker's metrics (HOST:PORT)")
    parser.add_argument("--dir", type=Path, default=Path("runs/monitor"))
    args = parser.parse_args()
    try:
        write_config(args.dir, args.serve or ["127.0.0.1:8000"], args.train or ["127.0.0.1:9400", "127.0.0.1:9401"],
                     args.rules)
        process = start(args.dir, args.port)
    except RungError as err:
        print(f"monitor: error: {err}", file=sys.stderr)
        return 2
    print(f"""monitor: Prometheus on http://127.0.0.1:{args.port} scraping rung servers {args.serve or ['127.0.0.1:8000']},
         training workers {args.train or ['127.0.0.1:9400', '127.0.0.1:9401']} (train.metrics_port=9400) and Ray.
Grafana: add a Prometheus data source with URL http://127.0.0.1:{args.port}, then Dashboards → Import the JSON
files in k8s/base/monitoring/dashboards/ and pick that data source. Ctrl-C stops Prometheus.""", flush=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        return 0


if __name__ == "__main__":
    sys.exit(main())
