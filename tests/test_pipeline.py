"""`rung pipeline` (what `make run` runs) end to end on the tiny preset: every stage's artifact, the served answer,
cached re-runs, a redone stage after an interruption, and a taken port."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import run_rung

# `make test` runs this module alone, after the rest: the pipeline's sweep and two-worker training take both cores
pytestmark = pytest.mark.serial


def test_pipeline_end_to_end_then_cached_and_resumed(tmp_path, data_cache):
    out = tmp_path / "pipeline"
    args = ["pipeline", "tiny", "--exit", "--out", str(out), "--sweep-steps", "30", "--set", "train.steps=40",
            "--set", f"data.cache_dir={data_cache}"]
    with socket.socket() as taken:  # the default port may be free or not; this one certainly is taken
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        first = run_rung(*args, "--port", str(port), timeout=480)
        assert first.returncode == 0, first.stderr[-3000:]
    log = first.stdout + first.stderr
    for stage in ("data", "sweep", "train", "export"):
        assert f"pipeline: {stage}: " in log
    assert f"port {port} on 127.0.0.1 is taken" in log
    stages = json.loads((out / "stages.json").read_text())
    assert set(stages) == {"data", "sweep", "train", "export"}
    summary = json.loads((out / "sweep" / "summary.json").read_text())
    assert {s["width"] for s in summary["shapes"]} == {32, 64} and (out / "sweep" / "sweep.png").stat().st_size
    assert stages["train"]["result"]["loss"] < 7.0
    transfer = json.loads((out / "runs" / "tiny-target" / "transfer.json").read_text())
    assert transfer["values"]["train.lr"] == stages["sweep"]["result"]["lr"]
    # the LR was chosen on held-out data, and the target reports its validation loss
    assert summary["loss_used"] == transfer["loss_used"] == stages["sweep"]["result"]["loss_used"] == "validation"
    assert stages["train"]["result"]["val_loss"] < 7.0 and "validation" in first.stdout
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["hidden_size"] == 128
    assert "answer:" in first.stdout and "/v1" in first.stdout and "/metrics" in first.stdout

    # an interrupted export: its record is gone and the folder half-written; the next run redoes only that stage
    del stages["export"]
    (out / "stages.json").write_text(json.dumps(stages))
    (out / "model" / "config.json").write_text("{")
    second = run_rung(*args, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("data", "sweep", "train"):
        assert f"pipeline: {stage}: cached" in second.stdout
    assert "pipeline: export: cached" not in second.stdout
    assert json.loads((out / "model" / "config.json").read_text())["hidden_size"] == 128
    assert "answer:" in second.stdout
