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


def test_evolve_validates_the_whole_config_again_and_configs_are_frozen():
    import dataclasses

    from rung.config import evolve

    cfg = load_run_config("tiny")
    wider = evolve(cfg, {"model.d_model": 128, "model.n_heads": 8, "train.lr": 1e-3})
    assert (wider.model.d_model, wider.model.n_heads, wider.train.lr) == (128, 8, 1e-3)
    assert cfg.model.d_model == 64  # the original is untouched
    with pytest.raises(ConfigError, match="^model.d_model: 64 is not divisible by n_heads"):
        evolve(cfg, {"model.n_heads": 3})  # a sub-config's own check runs again
    with pytest.raises(ConfigError, match="^param.base_width: 128 is larger than model.d_model"):
        evolve(cfg, {"param.base_width": 128})  # and the constraints between sub-configs
    with pytest.raises(ConfigError, match="^train.nope: no such config field"):
        evolve(cfg, {"train.nope": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0


def test_serve_settings_go_through_the_config_loader():
    from rung.serving.config import EngineConfig, serve_config

    config = serve_config({"model_dir": "m", "max_num_seqs": 8, "api_key": "k", "dtype": "bfloat16"})
    assert config.engine == EngineConfig(max_num_seqs=8, dtype="bfloat16") and config.api_key == "k"
    for settings, field in (({"max_num_seqs": 0}, "engine.max_num_seqs"), ({"block_size": -2}, "engine.block_size"),
                            ({"max_num_seqs": "8"}, "engine.max_num_seqs"), ({"dtype": "int8"}, "engine.dtype"),
                            ({"max_queued_requests": 0}, "max_queued_requests"), ({"num_gpus": 1}, "num_gpus"),
                            ({"backend": "vllm", "deterministic": True}, "engine.deterministic")):
        with pytest.raises(ConfigError) as caught:
            serve_config({"model_dir": "m", **settings})
        assert caught.value.field == field, (settings, str(caught.value))


@pytest.mark.parametrize("flag, value, message", [
    ("--max-num-seqs", "0", "must be at least 1, got 0"), ("--block-size", "0", "must be at least 1, got 0"),
    ("--nano-batches", "0", "must be at least 1, got 0"), ("--max-num-batched-tokens", "-1", "must be at least 1, got -1"),
    ("--max-queued-requests", "0", "must be at least 1, got 0"), ("--device", "tpu", "must be cpu, cuda or cuda:N"),
    ("--gpu-memory-utilization", "0", "must be in (0, 1], got 0.0"),
    ("--gpu-memory-utilization", "1.2", "must be in (0, 1], got 1.2")])
def test_bad_serve_flags_exit_2_naming_the_flag(tmp_path, flag, value, message):
    result = run_rung("serve", str(tmp_path), flag, value)
    assert result.returncode == 2
    assert_clean_failure(result, f"rung: error: {flag}: {message}")


def test_the_serve_flags_default_to_the_config_defaults():
    from rung.cli import build_parser
    from rung.serving.config import serve_config
    from rung.serving.flags import serve_settings

    args = build_parser().parse_args(["serve", "folder"])
    assert serve_config(serve_settings(args)) == serve_config({"model_dir": "folder"})


def test_no_prefix_caching_turns_the_engine_setting_off():
    from rung.cli import build_parser
    from rung.serving.config import serve_config
    from rung.serving.flags import serve_settings

    parser = build_parser()
    assert serve_config(serve_settings(parser.parse_args(["serve", "folder"]))).engine.enable_prefix_caching
    off = serve_config(serve_settings(parser.parse_args(["serve", "folder", "--no-prefix-caching"])))
    assert off.engine.enable_prefix_caching is False


def test_gpu_scale_presets_count_their_published_sizes_without_being_built():
    """Counting is arithmetic on the config: a 7B model is never built on this box to be counted."""
    from rung.jobs.model.counting import count
    from rung.jobs.presets import GPU_PRESETS

    small = load_run_config("small")
    expected = {"gpt-125m": 124e6, "gpt-350m": 354e6, "gpt-1.3b": 1.31e9, "llama-7b": 6.74e9, "moe-8x350m": 1.77e9}
    assert set(GPU_PRESETS) == set(expected)
    for name, params in expected.items():
        cfg = load_run_config(name)
        size = count(cfg.model, cfg.train.seq_len)
        assert size.total_params == pytest.approx(params, rel=0.01), name
        assert cfg.param.base_shape(cfg.model) == (small.model.d_model, small.model.n_layers), name  # the proxy
    assert count(load_run_config("llama-7b").model, 4096).total_params == 6_738_415_616  # Llama-2-7B's own count
    moe = count(load_run_config("moe-8x350m").model, 2048)
    assert moe.active_params < moe.total_params / 3  # top-2 of 8 experts
    result = run_rung("count", "llama-7b")
    assert result.returncode == 0 and '"total_params": 6738415616' in result.stdout
    assert_clean_failure(run_rung("count", "gpt-9b"), "unknown config", "llama-7b")
