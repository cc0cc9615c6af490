"""Sweeps, hyperparameter transfer, scaling-law fits and the ladder (issue: transfer and the scaling ladder)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rung.errors import ConfigError, RungError
from rung.jobs.experiments.grid import parse_grid
from rung.jobs.experiments.scaling_laws import (Chinchilla, PowerLaw, RoutedMoE, fit_chinchilla, fit_power_law,
                                                fit_routed_moe)
from rung.jobs.experiments.sweep import training_identity
from rung.jobs.experiments.transfer import apply_transfer
from rung.jobs.loading import load_run_config
from rung.jobs.model.build import build_model
from tests.conftest import assert_clean_failure, run_rung

# `make test` runs this module alone, after the rest: sweeps and ladders run two trainings at a time on Ray
pytestmark = pytest.mark.serial


def test_grid_syntax():
    assert parse_grid("lr=2^-12:2^-4:x2") == ("train.lr", [2.0**e for e in range(-12, -3)])
    field, values = parse_grid("lr=2^-8:2^-6:x2^0.5")
    assert field == "train.lr" and np.allclose(np.log2(values), [-8, -7.5, -7, -6.5, -6])
    assert parse_grid("init_std=0.01,0.02") == ("param.init_std", [0.01, 0.02])
    assert parse_grid("train.weight_decay=0,0.1") == ("train.weight_decay", [0.0, 0.1])
    for bad in ("lr", "lr=", "lr=2^-4:2^-8:x2", "lr=1:2:3", "lr=a,b", "lr=1:2:x1"):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_training_identity_merges_parametrizations_only_at_the_base_shape():
    def identity(param: str, width: int, depth: int, *overrides: str) -> str:
        cfg = load_run_config("tiny", [f"param.name={param}", f"model.d_model={width}", f"model.n_heads={width // 16}",
                                       f"model.n_layers={depth}", "param.base_width=32", "param.base_depth=2",
                                       f"name={param}-{width}-{depth}", *overrides])
        return training_identity(cfg)

    params = ("sp", "mup", "depth-mup", "completep")
    assert len({identity(p, 32, 2) for p in params}) == 1  # the base shape: one model under every rule
    assert len({identity(p, 64, 2) for p in params}) == 2  # wider: SP apart from the three width-aware ones
    assert len({identity(p, 32, 8) for p in params}) == 3  # deeper: SP = μP, Depth-μP, CompleteP
    assert identity("mup", 32, 2) != identity("mup", 32, 2, "param.init_std=0.05")  # any other field counts


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_cache):
    out = tmp_path_factory.mktemp("sweep")
    result = run_rung("sweep", "tiny", "--grid", "lr=2^-8:2^4:x16", "--widths", "32,64", "--params", "mup,sp",
                      "--set", "train.steps=20", "--set", "train.warmup_steps=2", "--set", "train.max_loss=12",
                      "--set", f"data.cache_dir={data_cache}", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_sweep_runs_every_point_and_records_divergence(sweep):
    out, stdout = sweep
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 4
    assert {(r["param"], r["width"], r["hparams"]["train.lr"]) for r in rows} == {
        (p, w, 2.0**e) for p in ("mup", "sp") for w in (32, 64) for e in (-8, -4, 0, 4)}
    # at the base width μP and SP are one model: its four points train once, the wider ones twice
    by_name = {r["name"]: r for r in rows}
    shared = [r for r in rows if "same_run_as" in r]
    assert {(r["param"], r["width"]) for r in shared} == {("sp", 32)}
    assert len(shared) == 4 and "12 to train" in stdout
    for row in shared:
        twin = by_name[row["same_run_as"]]
        assert (twin["param"], twin["width"], twin["hparams"]) == ("mup", 32, row["hparams"])
        assert row["status"] == twin["status"] and row.get("loss") == twin.get("loss")
    wide = {(r["param"], r["hparams"]["train.lr"]): r["loss"] for r in rows if r["width"] == 64 and r["status"] == "ok"}
    assert wide[("mup", 2.0**-8)] != wide[("sp", 2.0**-8)]
    diverged = [r for r in rows if r["hparams"]["train.lr"] == 16.0]
    assert all(r["status"] == "diverged" and r["error"] for r in diverged)  # a failed row, not a failed sweep
    assert all(r["status"] == "ok" and math.isfinite(r["loss"]) for r in rows if r["hparams"]["train.lr"] <= 2**-4)
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["loss_used"] == "validation" and r["loss"] == r["val_loss"] and r["train_loss"] > 0 for r in ok)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss_used"] == "validation"
    assert {(s["width"], s["param"]) for s in summary["shapes"]} == {(w, p) for w in (32, 64) for p in ("mup", "sp")}
    assert summary["transfer"]["mup"]["proxy"] == {"width": 32, "depth": 2, "experts": None}
    assert -8 <= summary["shapes"][0]["optimum_log2"]["train.lr"] <= 4
    assert "train.lr" in summary["spread_octaves"]["mup"]
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert "runs/s" in stdout and "eta" in stdout


def test_transfer_reproduces_the_proxy_and_scales_a_wider_target(sweep):
    out, _ = sweep
    summary = json.loads((out / "summary.json").read_text())
    eta = summary["transfer"]["mup"]["values"]["train.lr"]
    proxy, record = apply_transfer(load_run_config("tiny", ["model.d_model=32", "model.n_heads=2", "param.base_width=32"]), out)
    assert proxy.train.lr == eta and (proxy.param.base_width, proxy.param.base_depth) == (32, 2)
    assert record["sweep_id"] == summary["sweep_id"] and record["proxy_shape"]["width"] == 32
    assert record["loss_used"] == "validation"
    target, _ = apply_transfer(load_run_config("tiny", ["model.d_model=128", "model.n_heads=8"]), out / "summary.json")
    model, param = build_model(target)
    groups = {g["name"]: g["lr"] for g in param.param_groups(model, target.train.lr, 0.0, 1e-8)}
    assert groups["embedding"] == pytest.approx(eta) and groups["readout"] == pytest.approx(eta)
    assert groups["hidden"] == pytest.approx(eta / 4)  # μP: η/m with m = 128/32
    assert groups["block_norm"] == pytest.approx(eta)


@pytest.mark.parametrize("optimizer, settings, hidden_ratio", [
    ("muon", {"train.muon_momentum": 0.9}, 1 / 2),  # Muon's μP: η/√m with m = 128/32
    ("shampoo", {"train.damping": 1e-5, "train.precondition_every": 5}, 1.0),  # Shampoo's μP: η, whatever the width
    ("kfac", {"train.damping": 1e-5, "train.precondition_every": 5}, 1.0),  # K-FAC's μP: η too
    ("soap", {"train.precondition_block": 16, "train.precondition_every": 5}, 1 / 4),  # SOAP's (AdamW's) μP: η/m
])
def test_a_matrix_optimizer_sweeps_values_transfer_with_it_and_its_rules(optimizer, settings, hidden_ratio, sweep,
                                                                        tmp_path):
    out, _ = sweep
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == {"train.optimizer": "adamw", "train.muon_momentum": None, "train.damping": None,
                                    "train.precondition_every": None, "train.precondition_block": None}
    summary["optimizer"] = {"train.optimizer": optimizer, **settings}  # as that optimizer's sweep writes it
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    eta = summary["transfer"]["mup"]["values"]["train.lr"]
    target, record = apply_transfer(load_run_config("tiny", ["model.d_model=128", "model.n_heads=8"]), tmp_path)
    assert target.train.optimizer == optimizer and record["optimizer"]["train.optimizer"] == optimizer
    assert {field: getattr(target.train, field.removeprefix("train.")) for field in settings} == settings
    model, param = build_model(target)
    groups = {g["name"]: g["lr"] for g in param.param_groups(model, target.train.lr, 0.0, 1e-8, optimizer, 1e-5)}
    assert groups[f"hidden-{optimizer}"] == pytest.approx(eta * hidden_ratio)
    assert groups["embedding"] == pytest.approx(eta)


def test_train_with_hparams_from_records_provenance(sweep, tmp_path, data_cache):
    out, _ = sweep
    result = run_rung("train", "tiny", "--hparams-from", str(out / "summary.json"), "--set", "train.steps=2",
                      "--set", "train.warmup_steps=1", "--set", f"out_dir={tmp_path}", "--set",
                      f"data.cache_dir={data_cache}")
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads((tmp_path / "tiny" / "transfer.json").read_text())
    assert record["proxy_shape"]["width"] == 32 and record["target_shape"]["width"] == 64
    assert_clean_failure(run_rung("train", "tiny", "--hparams-from", str(tmp_path)), "summary.json")
    assert_clean_failure(run_rung("train", "tiny", "--hparams-from", str(out), "--set", "param.name=completep"),
                         "completep")


def test_sweep_bad_input(tmp_path):
    assert_clean_failure(run_rung("sweep", "tiny", "--grid", "lr=1,", "--grid", "lr=", "--out", str(tmp_path)),
                         "--grid")
    assert_clean_failure(run_rung("sweep", "tiny", "--grid", "lr=0.01", "--widths", "40", "--out", str(tmp_path)),
                         "head dim")


def test_chinchilla_fit_recovers_published_constants():
    rng = np.random.default_rng(0)
    n, d = (grid.ravel() for grid in np.meshgrid(np.logspace(7, 10, 7), np.logspace(9, 12, 7)))
    truth = Chinchilla(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
    fit = fit_chinchilla(n, d, truth.predict(n, d) * np.exp(rng.normal(0, 0.002, n.size)), bootstrap=10)
    assert abs(fit.alpha - 0.34) <= 0.02 and abs(fit.beta - 0.28) <= 0.02
    assert abs(fit.E / 1.69 - 1) <= 0.02
    assert fit.intervals["alpha"][0] <= fit.alpha <= fit.intervals["alpha"][1]
    n_opt, d_opt = fit.compute_optimal(1e21)
    assert 6 * n_opt * d_opt == pytest.approx(1e21, rel=1e-9)


def test_kaplan_power_laws_recover_their_exponents():
    n = np.logspace(6, 9, 8)
    d = np.logspace(8, 11, 8)
    rng = np.random.default_rng(1)
    law_n = fit_power_law(n, PowerLaw(0.076, 8.8e13).predict(n) * np.exp(rng.normal(0, 0.001, n.size)))
    law_d = fit_power_law(d, PowerLaw(0.095, 5.4e13).predict(d) * np.exp(rng.normal(0, 0.001, d.size)))
    assert abs(law_n.alpha - 0.076) <= 0.005 and abs(law_d.alpha - 0.095) <= 0.005


def test_routed_moe_fit_recovers_its_constants():
    truth = RoutedMoE(a=-0.082, b=-0.108, c=0.009, d=1.104, e_start=1.847, e_max=314.478)
    n, e = (grid.ravel() for grid in np.meshgrid(np.logspace(7, 9, 6), [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]))
    rng = np.random.default_rng(2)
    fit = fit_routed_moe(n, e, truth.predict(n, e) * np.exp(rng.normal(0, 0.0005, n.size)))
    for name in ("a", "b", "c", "d"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), abs=0.01), name
    assert fit.e_start == pytest.approx(truth.e_start, rel=0.2) and fit.e_max == pytest.approx(truth.e_max, rel=0.3)


def test_too_few_points_to_fit():
    with pytest.raises(RungError, match="more than 5 points"):
        fit_chinchilla([1e6, 1e7], [1e9, 1e9], [3.0, 2.9])


def test_ladder_fits_and_predicts_its_held_out_rung(tmp_path, data_cache):
    result = run_rung("ladder", "tiny", "--widths", "64,96,128", "--tokens", "2e4,4e4,8e4", "--set", "train.lr=0.01",
                      "--set", f"data.cache_dir={data_cache}", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    fit = json.loads((tmp_path / "fit.json").read_text())
    held = fit["held_out"]
    assert held["name"].startswith("w128") and fit["points"] == 8 and fit["loss_used"] == "validation"
    rows = {r["name"]: r for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert held["loss"] == rows[held["name"]]["val_loss"] and held["train_loss"] == rows[held["name"]]["train_loss"]
    assert math.isfinite(held["predicted"]) and held["relative_error"] < 0.5
    assert {"kaplan_n", "kaplan_d", "chinchilla"} <= set(fit)
    assert (tmp_path / "ladder.png").read_bytes()[:4] == b"\x89PNG"
    planned = run_rung("plan", "tiny", "--budget", "1e15", "--fit", str(tmp_path / "fit.json"), "--json")
    assert planned.returncode == 0, planned.stderr
    recommendation = json.loads(planned.stdout)["compute_optimal"]
    assert recommendation["shape"]["width"] % 16 == 0 and recommendation["steps"] > 0
    assert_clean_failure(run_rung("ladder", "tiny", "--widths", "32", "--tokens", "1e4", "--out", str(tmp_path)),
                         "--widths")


@pytest.fixture(scope="module")
def memorisable(tmp_path_factory) -> list[str]:
    """Twelve documents of random words over a 60-word vocabulary, every fourth held out: a tiny model learns the
    word statistics in tens of steps and then memorises its nine training documents, so more training lowers the
    training loss and raises the validation loss."""
    import random

    root = tmp_path_factory.mktemp("memorisable")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    docs = [" ".join(rng.choice(words) for _ in range(100)) for _ in range(12)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    sets = [f"data.sources=[{root / 'docs.jsonl'}]", "data.vocab_size=300", "data.validation_fraction=0.25",
            f"data.cache_dir={root / 'cache'}", "train.seq_len=32", "train.global_batch=8", "train.warmup_steps=2"]
    return [a for s in sets for a in ("--set", s)]


def test_a_sweep_and_a_ladder_decide_on_validation_loss_where_it_disagrees_with_training_loss(memorisable, tmp_path):
    result = run_rung("sweep", "tiny", "--grid", "train.steps=16,64,512", *memorisable, "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["hparams"]["train.steps"]: r for r in map(json.loads, (tmp_path / "s" / "results.jsonl").read_text()
                                                        .splitlines())}
    by_train = min(rows, key=lambda steps: rows[steps]["train_loss"])
    by_validation = min(rows, key=lambda steps: rows[steps]["val_loss"])
    assert by_train == 512 and by_validation != by_train  # 512 steps memorise the training documents
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    (shape,) = summary["shapes"]
    assert summary["loss_used"] == "validation" and shape["best"]["train.steps"] == by_validation
    assert shape["best_loss"] == rows[by_validation]["val_loss"]
    assert shape["best_train_loss"] == rows[by_validation]["train_loss"]

    # 256 tokens a step: 16 and 512 steps at two widths; the held-out rung is the memorising one
    result = run_rung("ladder", "tiny", "--widths", "64,96", "--tokens", "4096,131072", *memorisable,
                      "--out", str(tmp_path / "l"))
    assert result.returncode == 0, result.stderr[-3000:]
    fit = json.loads((tmp_path / "l" / "fit.json").read_text())
    rungs = {r["name"]: r for r in map(json.loads, (tmp_path / "l" / "results.jsonl").read_text().splitlines())}
    held = rungs[fit["held_out"]["name"]]
    assert fit["loss_used"] == "validation" and fit["held_out"]["loss"] == held["val_loss"]
    assert held["val_loss"] > held["train_loss"] + 0.5
    by_train = sorted(rungs, key=lambda name: rungs[name]["train_loss"])
    assert by_train != sorted(rungs, key=lambda name: rungs[name]["loss"])  # the fit saw the validation order
    assert "validation loss" in result.stdout
