"""The coordinate check: the test that the parametrization rules are right (issue acceptance figures)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

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


# Every check of the module, run two at a time (each is a one-thread process) and read by the tests below:
# AdamW's width check takes every octave and 3 seeds; the matrix optimizers' 32 / 128 / 512 and 2 seeds. K-FAC's
# depth check runs at LR 0.03: its depth rule is its own (LR × m_L^(−1), damping × m_L^(−2α): the natural gradient
# undoes the branch multiplier), and at 0.01 its updates are too small to tell it from AdamW's depth rule, which
# applied to K-FAC shrinks the residual stream with depth at 0.03 (slope −0.45).
# SOAP runs in tiles of 16 (train.precondition_block, which divides every hidden side of tiny at 32-512): tiled, AdamW's
# width rule is exact for it; on whole matrices its hidden outputs drift down with width (FFN −0.33, soap.py).
MATRIX_OPTIMIZERS = ("muon", "shampoo", "soap", "kfac")
OWN_SETTINGS = {"soap": ("--set", "train.precondition_block=16")}
CHECKS = {
    "width-adamw": ("--params", "sp,mup", "--widths", "32,64,128,256,512"),
    **{f"width-{name}": ("--set", f"train.optimizer={name}", *OWN_SETTINGS.get(name, ()), "--params", "sp,mup",
                         "--widths", "32,128,512", "--seeds", "2") for name in MATRIX_OPTIMIZERS},
    "depth-adamw": ("--params", "sp,completep", "--depths", "2,4,8,16"),
    "depth-kfac": ("--set", "train.optimizer=kfac", "--params", "sp,completep", "--depths", "2,4,8,16", "--seeds", "2",
                   "--lr", "0.03"),
}


@pytest.fixture(scope="module")
def records(tmp_path_factory, data_cache) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("coordcheck")
    with ThreadPoolExecutor(2) as pool:
        return dict(zip(CHECKS, pool.map(lambda item: coordcheck(root / item[0], data_cache, *item[1]),
                                         CHECKS.items())))


def test_width_mup_is_flat_and_sp_grows(records):
    record = records["width-adamw"]
    assert record["sizes"] == [32, 64, 128, 256, 512]
    for module, value in record["slopes"]["mup"].items():
        assert abs(value) <= 0.25, (module, value)
    for module in ("attention", "ffn", "residual"):  # outputs of hidden matrices
        assert record["slopes"]["sp"][module] >= 0.5, (module, record["slopes"]["sp"])


@pytest.mark.parametrize("optimizer", MATRIX_OPTIMIZERS)
def test_width_mup_under_matrix_optimizers_is_flat_and_sp_grows(records, optimizer):
    """The same check with Muon, Shampoo, SOAP or K-FAC stepping the hidden matrices: their μP rules keep every
    activation's size flat in width, where SP lets the hidden outputs grow."""
    record = records[f"width-{optimizer}"]
    for module, value in record["slopes"]["mup"].items():
        assert abs(value) <= 0.25, (module, value)
    for module in ("attention", "ffn", "residual"):
        assert record["slopes"]["sp"][module] >= 0.5, (module, record["slopes"]["sp"])


@pytest.mark.parametrize("optimizer", ["adamw", "kfac"])
def test_depth_completep_is_flat_and_sp_grows(records, optimizer):
    record = records[f"depth-{optimizer}"]
    assert abs(record["slopes"]["completep"]["residual"]) <= 0.25, record["slopes"]["completep"]
    assert record["slopes"]["sp"]["residual"] >= 0.5, record["slopes"]["sp"]
