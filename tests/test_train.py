"""Training through the real CLI on a real DeepSpeed engine (CPU accelerator, gloo), on the built-in corpus."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import yaml

from tests.conftest import assert_clean_failure, run_rung

DTYPES = ("float32", "bfloat16")


def train(tmp_path, data_cache, *overrides: str, preset: str = "tiny") -> list[dict]:
    result = run_rung("train", preset, "--set", f"out_dir={tmp_path}", "--set", f"data.cache_dir={data_cache}",
                      *[arg for o in overrides for arg in ("--set", o)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tok/s" in result.stdout and "eta" in result.stdout  # progress with rate and ETA
    assert "attention kernel flash_attention" in result.stdout  # torch's fused CPU kernel, stated at start-up
    run_dir = tmp_path / preset
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["name"] == preset
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tiny_model_learns_in_200_steps_in_fp32_and_bf16(tmp_path, data_cache):
    with ThreadPoolExecutor(2) as pool:  # two one-thread training processes at once, one per core
        runs = dict(zip(DTYPES, pool.map(lambda dtype: train(tmp_path / dtype, data_cache, f"train.dtype={dtype}",
                                                             "train.steps=200"), DTYPES)))
    for dtype, rows in runs.items():
        assert len(rows) == 200
        first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-10:]) / 10
        assert first > 7.0  # ≈ ln(2048) at initialisation
        assert last < first - 2.0, (dtype, first, last)


def test_gradient_accumulation_matches_one_large_batch(tmp_path, data_cache):
    common = ("train.steps=8", "train.warmup_steps=2", "train.zero_stage=2")
    with ThreadPoolExecutor(2) as pool:  # two one-thread training processes at once
        whole, accumulated = pool.map(lambda job: train(tmp_path / job[0], data_cache, *common, job[1]),
                                      [("a", "train.micro_batch=16"), ("b", "train.micro_batch=4")])
    for a, b in zip(whole, accumulated):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)


def test_layerdrop_draws_the_same_layers_per_step_ramps_over_the_warmup_and_keeps_one():
    from rung.jobs.config import TrainConfig
    from rung.jobs.train.layerdrop import drop_rate, step_layers

    train = TrainConfig(layerdrop=0.5, warmup_steps=10, steps=2000)
    assert [drop_rate(train, step) for step in (0, 5, 10, 500)] == [0.0, 0.25, 0.5, 0.5]
    assert step_layers(train, 0, 8) is None  # p = 0 at the first step: the whole network, the forward as without
    assert step_layers(TrainConfig(steps=100), 50, 8) is None  # off: never a subset
    draws = [step_layers(train, step, 8) for step in range(10, 2000)]
    assert draws == [step_layers(train, step, 8) for step in range(10, 2000)]  # what every worker (and a resume) draws
    assert draws != [step_layers(TrainConfig(layerdrop=0.5, warmup_steps=10, steps=2000, seed=1), step, 8)
                     for step in range(10, 2000)]
    kept = [len(d) if d is not None else 8 for d in draws]
    assert min(kept) >= 1 and abs(sum(kept) / len(kept) / 8 - 0.5) < 0.03  # about half the layers, never none
    assert all(d == sorted(set(d)) for d in draws if d is not None)
    single = [step_layers(train, step, 1) for step in range(10, 200)]
    assert all(d is None for d in single)  # one layer: always kept


def test_layerdrop_gives_dropped_layers_a_zero_gradient_at_zero_0_and_2_alike(tmp_path, data_cache):
    """ZeRO-0 hands AdamW the parameters' own gradients (rung zero-fills the dropped layers'); ZeRO-2 its flat
    partitions (DeepSpeed zero-fills them): the same losses, step for step, and not those of the whole network."""
    common = ("model.n_layers=4", "train.steps=12", "train.warmup_steps=2", "train.log_every=1")
    runs = [("zero0", ("train.layerdrop=0.5", "train.zero_stage=0")),
            ("zero2", ("train.layerdrop=0.5", "train.zero_stage=2")), ("whole", ())]
    with ThreadPoolExecutor(2) as pool:  # one-thread training processes, one per core
        zero0, zero2, whole = pool.map(lambda run: train(tmp_path / run[0], data_cache, *common, *run[1]), runs)
    assert [r["loss"] for r in zero0] == pytest.approx([r["loss"] for r in zero2], abs=1e-6)
    assert zero0[0]["loss"] == whole[0]["loss"]  # step 0 trains the whole network (p rises over the warmup)
    assert zero0[-1]["loss"] != pytest.approx(whole[-1]["loss"], abs=1e-4)


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


def test_the_attention_kernel_is_chosen_at_start_up_and_the_math_fallback_is_refused_on_a_gpu():
    import torch
    from torch.nn.attention import SDPBackend

    from rung.errors import ConfigError
    from rung.jobs.loading import load_run_config
    from rung.jobs.train.attention_kernel import attention_kernel, require_fused

    for preset in ("tiny", "gpt-125m", "llama-7b"):
        assert attention_kernel(load_run_config(preset), torch.device("cpu")) == SDPBackend.FLASH_ATTENTION
    # No GPU here: the refusal is judged on the kernel torch would report for a CUDA device.
    odd = load_run_config("tiny", ["model.head_dim=12"])
    assert require_fused(SDPBackend.EFFICIENT_ATTENTION, torch.device("cuda"), odd) == SDPBackend.EFFICIENT_ATTENTION
    assert require_fused(SDPBackend.MATH, torch.device("cpu"), odd) == SDPBackend.MATH
    with pytest.raises(ConfigError, match="model.head_dim.*head dim 12"):
        require_fused(SDPBackend.MATH, torch.device("cuda"), odd)


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


FULL, SELECTIVE = "train.activation_checkpointing=full", "train.activation_checkpointing=selective"


@pytest.mark.parametrize("preset, stage, variants", [
    ("tiny", 0, ((FULL,), (SELECTIVE, "train.compile=true"))),
    ("tiny", 3, ((FULL,), ("train.offload=optimizer",))),
    ("tiny-moe", 2, ((SELECTIVE,), (FULL,))),
])
def test_activation_checkpointing_and_compile_keep_the_loss_curve(tmp_path, data_cache, preset, stage, variants):
    """Recomputing activations in backward changes the memory, not the arithmetic: fp32 losses (and MoE router
    losses) over 20 steps equal those without it (1e-6), under ZeRO-0, ZeRO-3's parameter hooks and MoE at ZeRO-2;
    so does ZeRO-3 with AdamW's state offloaded to host memory.
    Compiled blocks (Inductor's CPU backend) match eager to fp32 rounding (1e-5: the kernels reorder sums)."""
    common = ("train.steps=20", "train.warmup_steps=2", f"train.zero_stage={stage}", "train.eval_every=10")
    with ThreadPoolExecutor(2) as pool:  # the runs are independent one-thread processes: two at a time
        base, *runs = pool.map(lambda job: train(tmp_path / job[0], data_cache, *common, *job[1], preset=preset),
                               [("eager", ())] + [(str(index), variant) for index, variant in enumerate(variants)])
    for variant, rows in zip(variants, runs):
        rel = 1e-5 if "train.compile=true" in variant else 1e-6
        for a, b in zip(base, rows, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=rel), (variant, a["step"])
            assert b["router_loss"] == pytest.approx(a["router_loss"], rel=rel, abs=1e-12)
        assert rows[-1]["val_loss"] == pytest.approx(base[-1]["val_loss"], rel=rel)


def test_activation_checkpointing_lowers_the_measured_peak_memory(tmp_path, data_cache):
    """Long sequences, where activations dominate: each run's peak resident memory (its own process) falls when
    blocks (full) or FFNs (selective) are recomputed instead of kept."""
    shape = ("model.max_seq_len=1024", "train.seq_len=1024", "model.d_model=128", "model.n_layers=4",
             "train.global_batch=8", "train.micro_batch=8", "train.steps=1", "train.warmup_steps=0")
    modes = ("none", "full", "selective")
    with ThreadPoolExecutor(2) as pool:  # each run reports its own process's peak, so two may run at once
        rows = pool.map(lambda mode: train(tmp_path / mode, data_cache, *shape,
                                           f"train.activation_checkpointing={mode}"), modes)
        peak = {mode: run[-1]["peak_memory_bytes"] for mode, run in zip(modes, rows)}
    assert peak["full"] < 0.9 * peak["none"], peak
    assert peak["selective"] < peak["none"], peak
    assert_clean_failure(run_rung("train", "tiny", "--set", "train.activation_checkpointing=some"),
                         "train.activation_checkpointing")
    for unsupported in ("tiny-moe", "tiny --set train.zero_stage=3"):
        result = run_rung("train", *unsupported.split(), "--set", "train.compile=true", "--set", f"out_dir={tmp_path}")
        assert_clean_failure(result, "train.compile")
    result = run_rung("train", "tiny", "--set", "train.offload=all", "--set", f"out_dir={tmp_path}")
    assert_clean_failure(result, "train.offload", "ZeRO stage 3")
    assert not (tmp_path / "tiny-moe").exists() and not (tmp_path / "tiny").exists()


def test_the_reported_peak_memory_is_the_runs_own_not_its_parents(tmp_path, data_cache):
    """Linux carries an address space's high-water mark across exec, so ru_maxrss of a run started by a large
    process is that process's size; rung reads its own address space's mark (VmHWM) instead."""
    ballast = bytearray(3 << 29)  # 1.5 GiB held by this process while it starts the run
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))
    rows = train(tmp_path, data_cache, "train.steps=2", "train.warmup_steps=1")
    assert rows[-1]["peak_memory_bytes"] < 1 << 30, rows[-1]["peak_memory_bytes"]  # the run's own: ~0.45 GiB
    del ballast


def test_compile_blocks_compiles_every_block_and_nothing_else():
    """The equivalence test above would pass if nothing were compiled; this one checks that every block's call goes
    through torch.compile (the embedding, final norm and head stay eager)."""
    from rung.jobs.loading import load_run_config
    from rung.jobs.model.build import build_model
    from rung.jobs.train.deepspeed_engine import compile_blocks

    model, _ = build_model(load_run_config("tiny"))
    assert all(getattr(block, "_compiled_call_impl", None) is None for block in model.layers)
    compile_blocks(model)
    assert all(block._compiled_call_impl is not None for block in model.layers)
    assert getattr(model.embed_tokens, "_compiled_call_impl", None) is None
    assert getattr(model.lm_head, "_compiled_call_impl", None) is None
