"""Config loading and validation: every bad value is reported by its field path, from Python and the CLI."""

from __future__ import annotations

import pytest

from rung.config import apply_overrides, from_dict, to_dict
from rung.errors import ConfigError
from rung.jobs.config import RunConfig
from rung.jobs.loading import load_run_config
from tests.conftest import assert_clean_failure, run_rung


def test_presets_round_trip_through_plain_data():
    cfg = load_run_config("tiny-moe")
    assert from_dict(RunConfig, to_dict(cfg)) == cfg
    assert cfg.model.moe is not None and cfg.model.moe.n_experts == 4


def test_overrides_are_typed_and_nested(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: mine\nmodel:\n  d_model: 96\n  n_heads: 3\n")
    cfg = load_run_config(str(path), ["train.lr=1e-3", "model.moe.top_k=1", "train.betas=[0.8, 0.9]"])
    assert cfg.name == "mine" and cfg.model.d_model == 96
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.betas == (0.8, 0.9)
    assert cfg.model.moe.top_k == 1  # an override may create a section


@pytest.mark.parametrize("overrides, field", [
    (["model.d_model=100", "model.n_heads=3"], "model.d_model"),
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.moe.n_experts=2", "model.moe.top_k=3"], "model.moe.top_k"),
    (["param.name=ntk"], "param.name"),
    (["param.base_width=512"], "param.base_width"),
    (["param.base_depth=8"], "param.base_depth"),
    (["model.widht=64"], "model.widht"),
    (["train.steps=ten"], "train.steps"),
    (["train.global_batch=12"], "train.global_batch"),
    (["model.vocab_size=1000"], "model.vocab_size"),
    (["train.workers=2", "train.expert_parallel=2"], "train.expert_parallel"),  # tiny is dense
    (["model.moe.n_experts=3", "model.moe.top_k=1", "train.workers=2", "train.expert_parallel=2"],
     "train.expert_parallel"),
])
def test_invalid_fields_are_named(overrides, field):
    with pytest.raises(ConfigError) as err:
        load_run_config("tiny", overrides)
    assert err.value.field == field, str(err.value)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["model.d_model"])


@pytest.mark.parametrize("args, needle", [
    (["train", "tiny", "--set", "model.n_kv_heads=3"], "model.n_kv_heads"),
    (["train", "tiny", "--set", "param.name=ntk"], "param.name"),
    (["train", "tiny", "--set", "model.moe.top_k=9"], "model.moe.top_k"),
    (["train", "no-such-preset"], "no-such-preset"),
    (["train", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
])
def test_cli_rejects_bad_config_without_traceback(args, needle):
    assert_clean_failure(run_rung(*args), needle)
