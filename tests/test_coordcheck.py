"""The coordinate check: the test that the parametrization rules are right (issue acceptance figures)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_rung

COMMON = ("--set", "train.seq_len=64", "--set", "train.micro_batch=8", "--steps", "5", "--seeds", "3")


def coordcheck(tmp_path, data_cache, *args: str) -> dict:
    result = run_rung("coordcheck", "tiny", "--set", f"data.cache_dir={data_cache}", *COMMON, *args,
                      "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "models/s" in result.stdout and "eta" in result.stdout
    assert (tmp_path / "coordcheck.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((tmp_path / "coordcheck.json").read_text())


def test_width_mup_is_flat_and_sp_grows(tmp_path, data_cache):
    record = coordcheck(tmp_path, data_cache, "--params", "sp,mup", "--widths", "32,64,128,256,512")
    assert record["sizes"] == [32, 64, 128, 256, 512]
    for module, value in record["slopes"]["mup"].items():
        assert abs(value) <= 0.25, (module, value)
    for module in ("attention", "ffn", "residual"):  # outputs of hidden matrices
        assert record["slopes"]["sp"][module] >= 0.5, (module, record["slopes"]["sp"])


@pytest.mark.parametrize("optimizer", ["muon", "shampoo", "kfac"])
def test_width_mup_under_matrix_optimizers_is_flat_and_sp_grows(optimizer, tmp_path, data_cache):
    """The same check with Muon, Shampoo or K-FAC stepping the hidden matrices: their μP rules keep every
    activation's size flat in width, where SP lets the hidden outputs grow."""
    record = coordcheck(tmp_path, data_cache, "--set", f"train.optimizer={optimizer}", "--params", "sp,mup",
                        "--widths", "32,128,512", "--seeds", "2")  # AdamW's check above takes every octave
    for module, value in record["slopes"]["mup"].items():
        assert abs(value) <= 0.25, (module, value)
    for module in ("attention", "ffn", "residual"):
        assert record["slopes"]["sp"][module] >= 0.5, (module, record["slopes"]["sp"])


def test_depth_completep_is_flat_and_sp_grows(tmp_path, data_cache):
    record = coordcheck(tmp_path, data_cache, "--params", "sp,completep", "--depths", "2,4,8,16")
    assert abs(record["slopes"]["completep"]["residual"]) <= 0.25, record["slopes"]["completep"]
    assert record["slopes"]["sp"]["residual"] >= 0.5, record["slopes"]["sp"]


def test_depth_completep_under_kfac_is_flat_and_sp_grows(tmp_path, data_cache):
    """K-FAC's depth rule is its own (LR × m_L^(−1), damping × m_L^(−2α): the natural gradient undoes the branch
    multiplier). At LR 0.03 it keeps the residual stream flat in depth, where AdamW's depth rule applied to K-FAC
    shrinks it (slope −0.45); at 0.01 the updates are too small for the check to tell the two apart."""
    record = coordcheck(tmp_path, data_cache, "--set", "train.optimizer=kfac", "--params", "sp,completep",
                        "--depths", "2,4,8,16", "--seeds", "2", "--lr", "0.03")
    assert abs(record["slopes"]["completep"]["residual"]) <= 0.25, record["slopes"]["completep"]
    assert record["slopes"]["sp"]["residual"] >= 0.5, record["slopes"]["sp"]
