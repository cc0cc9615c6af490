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


def test_zero0_fp32_logs_a_finite_grad_norm_and_the_step_figures(tmp_path, data_cache):
    """Under ZeRO-0 fp32 (the default) DeepSpeed computes no gradient norm; rung's guard does, before the step."""
    rows = train(tmp_path, data_cache, "train.steps=4", "train.warmup_steps=1")
    assert all(0 < row["grad_norm"] < 1e3 for row in rows), [row["grad_norm"] for row in rows]
    assert all(row["data_seconds"] > 0 and row["peak_memory_bytes"] > 1 << 20 for row in rows)
    assert set(rows[-1]["group_lrs"]) >= {"embedding", "hidden", "block_norm", "final_norm", "readout"}
    assert rows[-1]["group_lrs"]["embedding"] == pytest.approx(rows[-1]["lr"])


def test_the_divergence_guard_refuses_a_non_finite_gradient_before_the_update():
    from types import SimpleNamespace

    import torch

    from rung.jobs.config import TrainConfig
    from rung.jobs.train.guard import DivergenceGuard, TrainingDiverged, gradient_norm

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(gradient_norm(model)) == pytest.approx(float(expected), rel=1e-6)
    guard = DivergenceGuard(TrainConfig(grad_clip=0.5), computes_norm=True)
    engine = SimpleNamespace(module=model)  # the guard reads only the engine's module here
    assert guard.before_update(engine, 0) == pytest.approx(float(expected), rel=1e-6)
    assert float(gradient_norm(model)) == pytest.approx(0.5, rel=1e-4)  # clipped with the norm it checked
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.grad[0, 0] = float("inf")
    with pytest.raises(TrainingDiverged, match="non-finite gradient norm .* at step 3; the optimizer step was not"):
        guard.before_update(engine, 2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
