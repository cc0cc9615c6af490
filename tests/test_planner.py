"""`rung plan`: the memory model against what the training loop measures, and the command's answers and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import REPO, assert_clean_failure, run_rung

# Each shape trains three steps in a fresh process; its peak resident set (the loop's StepMetrics.peak_memory_bytes,
# VmHWM) less the resident set before the engine was built is compared with the planner's total. glibc keeps freed
# heap memory resident, which would make RSS an allocator's high-water mark rather than the tensors'; with
# MALLOC_MMAP_THRESHOLD_ fixed every allocation over 64 KiB is its own mapping, returned when freed, so RSS follows
# the live tensors as the CUDA caching allocator's max_memory_allocated does on a GPU.
MEASURE = r"""
import json, sys, torch
from rung.platform import runtime
runtime.configure_process()
from rung.jobs.loading import load_run_config
from rung.jobs.planning.memory import estimate
from rung.jobs.train.deepspeed_engine import build_engine, rung_clips
from rung.jobs.train.guard import DivergenceGuard
from rung.jobs.train.step import train_step

runtime.init_process_group(rank=0, world_size=1, local_rank=0, init_method=runtime.file_rendezvous())


class RandomBatches:
    def __init__(self, cfg):
        tokens = torch.randint(cfg.model.vocab_size, (cfg.train.global_batch, cfg.train.seq_len + 1))
        self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

    def batch(self, step, rank, world_size):
        return self.inputs, self.targets


def resident():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


overrides = json.loads(sys.argv[1])
cfg = load_run_config("small", [*overrides, "train.steps=4", "train.warmup_steps=1"])
import torch._dynamo  # DeepSpeed imports it (and with it Triton, where installed) while building the engine: code,
before = resident()  # not memory the planner models, so it is loaded before the baseline
engine = build_engine(cfg, world_size=1)
guard, batches = DivergenceGuard(cfg.train, computes_norm=rung_clips(cfg)), RandomBatches(cfg)
rows = [train_step(engine, batches, step, 0, 1, guard, cfg.train) for step in range(3)]
print(json.dumps({"overrides": overrides, "measured": rows[-1].peak_memory_bytes - before,
                  "predicted": estimate(cfg, 1).total}))
"""

LONG = ["train.seq_len=512", "train.micro_batch=8", "train.global_batch=8"]
WIDE = ["model.d_model=512", "model.n_heads=8", "train.micro_batch=2", "train.global_batch=2"]
SHAPES = [LONG, [*LONG, "train.activation_checkpointing=full"], [*LONG, "train.activation_checkpointing=selective"],
          [*WIDE, "train.zero_stage=2"], [*WIDE, "train.zero_stage=3"], [*WIDE, "train.zero_stage=2",
                                                                          "train.dtype=bfloat16"]]


def measure(overrides: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(overrides)], cwd=REPO, env=env, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_the_memory_model_is_within_15_percent_of_the_measured_peak():
    with ThreadPoolExecutor(2) as pool:  # two single-threaded trainings at a time: each measures its own process
        rows = list(pool.map(measure, SHAPES))
    for row in rows:
        assert row["measured"] > 300e6, row  # the model, not the interpreter, dominates what is compared
        assert row["predicted"] == pytest.approx(row["measured"], rel=0.15), row
    # checkpointing's saving is measured, and the model predicts it
    none, full = rows[0], rows[1]
    assert full["measured"] < 0.85 * none["measured"] and full["predicted"] < 0.85 * none["predicted"]


def test_plan_answers_for_every_gpu_preset_and_exits_1_when_the_run_does_not_fit():
    presets = ("gpt-125m", "gpt-350m", "llama-7b", "moe-8x350m")
    calls = [("gpt-1.3b", "--gpus", "8", "--gpu", "h200", "--json"),
             ("gpt-1.3b", "--gpus", "8", "--activation-checkpointing", "full", "--json"),
             ("llama-7b", "--gpus", "1", "--zero", "0"),
             *[(preset, "--gpus", "8", "--set", "train.expert_parallel=1") for preset in presets]]
    with ThreadPoolExecutor(2) as pool:  # two CLI start-ups at a time
        fits, lean, crowded, *answered = pool.map(lambda args: run_rung("plan", *args), calls)
    assert fits.returncode == 0, fits.stderr
    plan = json.loads(fits.stdout)
    memory = plan["memory_per_gpu"]
    assert plan["fits"] and plan["gpus"] == 8 and plan["gpu"] == "h200"
    assert memory["total"] == sum(memory[k] for k in ("parameters", "gradients", "optimizer", "activations",
                                                      "backward_working_set"))
    assert plan["largest_micro_batch"] >= plan["micro_batch"] and plan["tokens_per_second"] > 0
    # ZeRO-2 shards the gradients and optimizer over the 8 GPUs, not the parameters
    assert memory["optimizer"] == pytest.approx(12 * 1.31e9 / 8, rel=0.02)
    assert memory["parameters"] == pytest.approx(2 * 1.31e9, rel=0.02)

    lean = json.loads(lean.stdout)
    assert lean["memory_per_gpu"]["activations"] < plan["memory_per_gpu"]["activations"] / 4
    assert lean["step_seconds"] > plan["step_seconds"] * 1.2  # recomputation costs a forward, at the same MFU

    assert crowded.returncode == 1, crowded.stderr
    assert "does NOT fit" in crowded.stdout and "GiB" in crowded.stdout and "optimizer state" in crowded.stdout
    for preset, result in zip(presets, answered):
        assert result.returncode in (0, 1) and "memory per GPU" in result.stdout, (preset, result.stderr)


@pytest.mark.parametrize("args, needle", [
    (["tiny", "--gpus", "0"], "--gpus"),
    (["tiny", "--gpu", "v100"], "h100"),
    (["no-such-preset"], "no-such-preset"),
    (["tiny", "--set", "train.offload=optimizer"], "train.offload"),
    (["tiny-moe", "--zero", "3"], "ZeRO stage 3"),
    (["tiny-moe", "--set", "train.compile=true"], "train.compile"),
    (["tiny", "--budget", "1e18"], "--fit"),
])
def test_plan_refuses_bad_input_with_exit_2(args, needle, tmp_path):
    result = run_rung("plan", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert_clean_failure(result, needle)
    assert not any(tmp_path.iterdir())  # nothing written
