"""Training through the real CLI on a real DeepSpeed engine (CPU accelerator, gloo), on the built-in corpus."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.conftest import assert_clean_failure, run_rung


def train(tmp_path, data_cache, *overrides: str, preset: str = "tiny") -> list[dict]:
    result = run_rung("train", preset, "--set", f"out_dir={tmp_path}", "--set", f"data.cache_dir={data_cache}",
                      *[arg for o in overrides for arg in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tok/s" in result.stdout and "eta" in result.stdout  # progress with rate and ETA
    run_dir = tmp_path / preset
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["name"] == preset
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_learns_in_200_steps(tmp_path, data_cache, dtype):
    rows = train(tmp_path, data_cache, f"train.dtype={dtype}", "train.steps=200")
    assert len(rows) == 200
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-10:]) / 10
    assert first > 7.0  # ≈ ln(2048) at initialisation
    assert last < first - 2.0, (first, last)


def test_gradient_accumulation_matches_one_large_batch(tmp_path, data_cache):
    common = ("train.steps=8", "train.warmup_steps=2", "train.zero_stage=2")
    whole = train(tmp_path / "a", data_cache, *common, "train.micro_batch=16")
    accumulated = train(tmp_path / "b", data_cache, *common, "train.micro_batch=4")
    for a, b in zip(whole, accumulated):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_moe_trains_with_zero2_and_zero3_is_refused(tmp_path, data_cache):
    rows = train(tmp_path, data_cache, "train.steps=30", "train.warmup_steps=5", "train.zero_stage=2",
                 preset="tiny-moe")
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0
    assert all(r["router_loss"] > 0 for r in rows)
    result = run_rung("train", "tiny-moe", "--set", "train.zero_stage=3", "--set", f"out_dir={tmp_path}",
                      "--set", f"data.cache_dir={data_cache}")
    assert_clean_failure(result, "train.zero_stage", "MoE")
