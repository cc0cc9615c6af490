"""The coordinate check: the test that the parametrization rules are right (issue acceptance figures)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

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


def test_width_mup_under_matrix_optimizers_is_flat_and_sp_grows(tmp_path, data_cache):
    """The same check with Muon, Shampoo or K-FAC stepping the hidden matrices: their μP rules keep every
    activation's size flat in width, where SP lets the hidden outputs grow. Two checks at a time: each is a
    one-thread process."""
    optimizers = ("muon", "shampoo", "kfac")
    with ThreadPoolExecutor(2) as pool:
        records = dict(zip(optimizers, pool.map(lambda name: coordcheck(
            tmp_path / name, data_cache, "--set", f"train.optimizer={name}", "--params", "sp,mup",
            "--widths", "32,128,512", "--seeds", "2"), optimizers)))  # AdamW's check above takes every octave
    for optimizer, record in records.items():
        for module, value in record["slopes"]["mup"].items():
            assert abs(value) <= 0.25, (optimizer, module, value)
        for module in ("attention", "ffn", "residual"):
            assert record["slopes"]["sp"][module] >= 0.5, (optimizer, module, record["slopes"]["sp"])


def test_depth_completep_is_flat_and_sp_grows(tmp_path, data_cache):
    """AdamW's rule, and K-FAC's own (LR × m_L^(−1), damping × m_L^(−2α): the natural gradient undoes the branch
    multiplier), side by side. K-FAC's runs at LR 0.03, where it keeps the residual stream flat in depth and AdamW's
    depth rule applied to K-FAC shrinks it (slope −0.45); at 0.01 its updates are too small to tell the two apart."""
    checks = {"adamw": (), "kfac": ("--set", "train.optimizer=kfac", "--seeds", "2", "--lr", "0.03")}
    with ThreadPoolExecutor(2) as pool:
        records = dict(zip(checks, pool.map(lambda item: coordcheck(
            tmp_path / item[0], data_cache, "--params", "sp,completep", "--depths", "2,4,8,16", *item[1]),
            checks.items())))
    for optimizer, record in records.items():
        assert abs(record["slopes"]["completep"]["residual"]) <= 0.25, (optimizer, record["slopes"]["completep"])
        assert record["slopes"]["sp"]["residual"] >= 0.5, (optimizer, record["slopes"]["sp"])
