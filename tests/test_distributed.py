"""Multi-worker training on a real local Ray cluster with real DeepSpeed engines, checkpoints and failures.

Each `rung train` runs in its own process. One worker trains in that process; the multi-worker runs that check what
the workers compute join one `ray start --head` cluster for the module (`--address`, with its token), and those that
check Ray itself (a killed worker, an unreachable address) start the embedded Ray a run makes by default.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rung.platform.checkpoint import CheckpointStore, verify
from tests.conftest import REPO, RayHead, assert_clean_failure, free_port, ray_head, run_rung

# `make test` runs this module alone, after the rest: two-worker DeepSpeed runs on Ray take both cores
pytestmark = pytest.mark.serial

SHORT = ("train.steps=20", "train.warmup_steps=5", "train.eval_every=7")  # validation at steps 7, 14 and 20
EVALUATED = [7, 14, 20]


def validated(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}


@pytest.fixture(scope="module")
def cluster() -> RayHead:
    """The module's Ray cluster: joining it spares each multi-worker run starting and stopping its own (~7 s)."""
    with ray_head() as head:
        yield head


def args_for(out: Path, data_cache: Path, name: str, overrides, workers: int, extra=(), preset="tiny",
             cluster: RayHead | None = None) -> list[str]:
    sets = [f"out_dir={out}", f"name={name}", f"data.cache_dir={data_cache}", *overrides]
    joins = ("--address", cluster.gcs) if cluster else ()
    return ["train", preset, "--workers", str(workers), *joins, *extra, *[a for s in sets for a in ("--set", s)]]


def train(out: Path, data_cache: Path, name: str, *overrides: str, workers: int = 1, extra=(),
          preset: str = "tiny", cluster: RayHead | None = None) -> list[dict]:
    """A `rung train` run's metric rows; with `cluster` (multi-worker runs) on that cluster."""
    from rung.jobs.run_dir import RunDir
    from rung.jobs.train.metrics import read_metrics

    result = run_rung(*args_for(out, data_cache, name, overrides, workers, extra, preset, cluster),
                      env=cluster.env if cluster else None)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_metrics(RunDir(out / name))


def assert_same_curve(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= rel * abs(x["loss"]), (x["step"], x["loss"], y["loss"])


def test_two_workers_zero2_match_one_worker(tmp_path, data_cache, cluster):
    one = train(tmp_path, data_cache, "one", *SHORT, "train.zero_stage=2")
    two = train(tmp_path, data_cache, "two", *SHORT, "train.zero_stage=2", workers=2, cluster=cluster)
    assert len(two) == 20
    assert_same_curve(one, two, rel=1e-4)
    # each rank scores its share of the validation set and one reduction makes the whole set's loss
    assert list(validated(two)) == EVALUATED
    for step, loss in validated(one).items():
        assert validated(two)[step] == pytest.approx(loss, rel=1e-4)


@pytest.mark.parametrize("stage, dtype", [(1, "float32"), (3, "bfloat16")])
def test_other_zero_stages_and_bf16_train_on_two_workers(tmp_path, data_cache, cluster, stage, dtype):
    rows = train(tmp_path, data_cache, "run", *SHORT, f"train.zero_stage={stage}", f"train.dtype={dtype}",
                 "train.activation_checkpointing=selective", workers=2,
                 cluster=cluster)  # recomputation under bf16 and ZeRO 1/3
    assert len(rows) == 20 and rows[-1]["loss"] < rows[0]["loss"] - 1.0
    losses = validated(rows)  # ZeRO-3 gathers parameters in every forward: both ranks evaluate in step
    assert list(losses) == EVALUATED and losses[20] < losses[7]


def assert_resume_reproduces_the_uninterrupted_run(out: Path, data_cache: Path, stage: int, dtype: str, offload: str,
                                                   optimizer: str, workers: int, cluster: RayHead | None = None,
                                                   sets: tuple[str, ...] = ()):
    """Train 20 steps with a checkpoint at step 10, resume a run directory holding only that checkpoint, and
    compare steps 11-20 (losses to 1e-6, LRs, the evaluation schedule and its losses)."""
    case = f"ZeRO-{stage} {dtype} offload={offload} {optimizer} × {workers}"
    common = (*SHORT, "train.checkpoint_every=10", f"train.zero_stage={stage}", f"train.dtype={dtype}",
              f"train.offload={offload}", f"train.optimizer={optimizer}", *sets)
    full = train(out, data_cache, "full", *common, workers=workers, cluster=cluster)
    # "Stopped after its step-10 checkpoint": a run directory holding only that checkpoint.
    (out / "cut" / "checkpoints").mkdir(parents=True)
    os.rename(out / "full" / "checkpoints" / "step_00000010", out / "cut" / "checkpoints" / "step_00000010")
    resumed = train(out, data_cache, "cut", *common, workers=workers, extra=("--resume",), cluster=cluster)
    assert [r["step"] for r in resumed] == list(range(11, 21)), case
    tolerance = 1e-6
    for a, b in zip(full[10:], resumed):
        assert abs(a["loss"] - b["loss"]) <= tolerance, (case, a["step"], a["loss"], b["loss"])
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12), case
    assert list(validated(resumed)) == [14, 20], case  # the evaluation schedule continues where it was
    for step, loss in validated(resumed).items():
        assert loss == pytest.approx(validated(full)[step], abs=tolerance), (case, step)


RESUMED_ON_ONE_WORKER = [  # (ZeRO stage, dtype, offload, optimizer, settings)
    (0, "float32", "none", "adamw", ()), (3, "float32", "none", "adamw", ()),
    (2, "bfloat16", "none", "adamw", ()),  # stage 2's checkpoint, in bf16
    (3, "float32", "all", "adamw", ()),  # parameters and AdamW on the host
    (0, "bfloat16", "none", "muon", ()),  # Muon's momentum beside DeepSpeed's bf16 optimizer, whose counter starts at 1
    (0, "float32", "none", "shampoo", ()), (0, "float32", "none", "soap", ()),  # factors, roots / eigenbases, moments
    (0, "float32", "none", "soap", ("train.precondition_block=16",)),  # SOAP's tiled state
    (0, "float32", "none", "kfac", ()),  # layer statistics from hooks, inverses, π
    (0, "float32", "none", "adamw", ("train.layerdrop=0.3",)),  # the layers each step drops, drawn again on resume
]


def test_resume_on_one_worker_reproduces_the_uninterrupted_run(tmp_path, data_cache):
    """Every one-worker case, two at a time: each is a one-thread process of its own."""
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda case: assert_resume_reproduces_the_uninterrupted_run(
            tmp_path / "-".join(map(str, case[:4])) / str(len(case[4])), data_cache, *case[:4], workers=1,
            sets=case[4]), RESUMED_ON_ONE_WORKER))


def test_resume_on_two_workers_reproduces_the_uninterrupted_run(tmp_path, data_cache, cluster):
    """K-FAC's layer statistics are all-reduced, so both workers keep the same factors; in bf16, through DeepSpeed's
    bf16 optimizer around rung's matrix optimizers (the other Kronecker-factored ones share its state handling)."""
    assert_resume_reproduces_the_uninterrupted_run(tmp_path, data_cache, 0, "bfloat16", "none", "kfac", 2, cluster)


def test_corrupted_newest_checkpoint_is_skipped(tmp_path, data_cache):
    common = (*SHORT, "train.checkpoint_every=10")
    train(tmp_path, data_cache, "run", *common)
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    newest = store.root / store.name(20) / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])  # flip bytes inside the weights
    newest.write_bytes(bytes(data))
    assert "checksum mismatch" in verify(newest.parent)
    result = run_rung(*args_for(tmp_path, data_cache, "run", common, 1, ("--resume",)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint" in result.stderr and "checksum mismatch" in result.stderr
    assert "resumed from" in result.stdout and "step_00000010 at step 10" in result.stdout


def test_checkpoints_mirrored_to_a_uri_resume_on_a_machine_without_them(tmp_path, data_cache):
    """An object-store URI through pyarrow.fs; file:// exercises the same code path as s3:// or gs:// here."""
    remote = tmp_path / "bucket"
    common = (*SHORT, "train.checkpoint_every=10", f"train.checkpoint_uri=file://{remote}")
    full = train(tmp_path, data_cache, "run", *common)
    assert sorted(p.name for p in remote.iterdir()) == ["step_00000010", "step_00000020"]
    assert all((remote / name / "manifest.json").is_file() for name in ("step_00000010", "step_00000020"))
    # A fresh machine: no run directory at all, and the newest upload was interrupted (no manifest).
    shutil.rmtree(tmp_path / "run")
    shutil.rmtree(remote / "step_00000020")
    (remote / "step_00000030").mkdir()
    (remote / "step_00000030" / "model.safetensors").write_bytes(b"partial")
    resumed = train(tmp_path, data_cache, "run", *common, extra=("--resume",))
    assert [r["step"] for r in resumed] == list(range(11, 21))
    for a, b in zip(full[10:], resumed):
        assert abs(a["loss"] - b["loss"]) <= 1e-6
    result = run_rung(*args_for(tmp_path, data_cache, "other", (*SHORT, "train.checkpoint_uri=file:///proc/x"), 1))
    assert_clean_failure(result, "file:///proc/x")


def test_resume_refuses_another_model_shape_and_keeps_the_checkpoint(tmp_path, data_cache):
    train(tmp_path, data_cache, "run", "train.steps=10", "train.warmup_steps=2")
    result = run_rung(*args_for(tmp_path, data_cache, "run", ("train.steps=10", "train.warmup_steps=2",
                                                              "model.d_model=128"), 1, ("--resume",)))
    assert_clean_failure(result, "different model shape", "d_model")
    result = run_rung(*args_for(tmp_path, data_cache, "run", ("train.steps=10", "train.warmup_steps=2",
                                                              "train.optimizer=muon"), 1, ("--resume",)))
    assert_clean_failure(result, "holds adamw's state", "train.optimizer=adamw")
    store = CheckpointStore(tmp_path / "run" / "checkpoints")
    assert [s for s, _ in store.committed()] == [10] and verify(store.committed()[0][1]) is None
    result = run_rung(*args_for(tmp_path, data_cache, "run", ("train.steps=10", "train.warmup_steps=2"), 1))
    assert_clean_failure(result, "--resume")  # a fresh start would silently mix two runs


def test_killed_worker_restarts_from_checkpoint_and_metrics_pass_promtool(tmp_path, data_cache):
    common = ("train.steps=80", "train.warmup_steps=5", "train.checkpoint_every=10")
    pool = ThreadPoolExecutor(1)  # the one-worker baseline trains meanwhile, in a process of its own
    baseline = pool.submit(train, tmp_path, data_cache, "baseline", *common)
    port = free_port()
    argv = args_for(tmp_path, data_cache, "faulty", (*common, "train.max_failures=1", f"train.metrics_port={port}"), 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "rung.cli", *argv], cwd=REPO, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "faulty"
    try:
        exposition = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if exposition is None:
                try:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
                    if "rung_train_loss{" in text:
                        exposition = text
                except OSError:
                    pass
            if (run_dir / "checkpoints" / "step_00000010" / "manifest.json").is_file() and exposition:
                break
            time.sleep(0.05)
        assert exposition is not None, "no metrics were served while training"
        victim = json.loads((run_dir / "workers" / "rank1.json").read_text())["pid"]
        os.kill(victim, signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
        pool.shutdown()
    assert process.returncode == 0, output[-4000:]
    assert "resumed from" in output
    from rung.jobs.run_dir import RunDir
    from rung.jobs.train.metrics import read_metrics

    assert_same_curve(baseline.result(), read_metrics(RunDir(run_dir)), rel=1e-4)
    for name in ("rung_train_loss", "rung_train_tokens_per_second", "rung_train_mfu_ratio", "rung_train_tokens_total",
                 "rung_train_grad_norm", "rung_train_learning_rate", "rung_train_step_duration_seconds"):
        assert f"\n{name}{{" in exposition, name
    lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, text=True, capture_output=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_expert_parallel_moe_matches_replicated_experts(tmp_path, data_cache, cluster):
    from safetensors.torch import load_file

    common = (*SHORT, "train.zero_stage=2", "train.checkpoint_every=20")
    dp = train(tmp_path, data_cache, "dp", *common, workers=2, preset="tiny-moe", cluster=cluster)
    # with full activation checkpointing too: the recomputed blocks rerun the all-to-alls on both ranks alike
    ep = train(tmp_path, data_cache, "ep", *common, "train.expert_parallel=2", "train.activation_checkpointing=full",
               workers=2, preset="tiny-moe", cluster=cluster)
    assert [json.loads((tmp_path / "ep" / "workers" / f"rank{r}.json").read_text())["experts"] for r in (0, 1)] \
        == [[0, 1], [2, 3]]  # each rank holds half of every layer's experts
    assert_same_curve(dp, ep, rel=1e-4)
    for step, loss in validated(dp).items():  # evaluation runs the experts' all-to-alls on both ranks alike
        assert validated(ep)[step] == pytest.approx(loss, rel=1e-4)
    assert all(row["moe_load_imbalance"] >= 1.0 and 0.0 <= row["moe_dropped_fraction"] < 1.0 for row in ep)
    weights = [load_file(str(tmp_path / name / "checkpoints" / "step_00000020" / "model.safetensors"))
               for name in ("dp", "ep")]
    assert weights[0].keys() == weights[1].keys()  # the checkpoint holds every expert, whoever trained it
    for key in weights[0]:
        assert (weights[0][key] - weights[1][key]).abs().max() < 1e-3, key


def test_unreachable_address_fails_fast(tmp_path, data_cache):
    started = time.monotonic()
    result = run_rung(*args_for(tmp_path, data_cache, "x", SHORT, 2, ("--address", f"127.0.0.1:{free_port()}")))
    assert_clean_failure(result, "cannot reach the Ray cluster")
    assert time.monotonic() - started < 60  # seconds, not a hang


def test_more_workers_than_the_cluster_has(tmp_path, data_cache, cluster):
    result = run_rung(*args_for(tmp_path, data_cache, "x", ("train.global_batch=512",), 64, cluster=cluster),
                      env=cluster.env)
    assert_clean_failure(result, "train.workers", "64 workers")
    result = run_rung(*args_for(tmp_path, data_cache, "y", ("train.use_gpu=true",), 2, cluster=cluster),
                      env=cluster.env)
    assert_clean_failure(result, "train.use_gpu", "need 2 GPUs")


def test_unwritable_run_directory(tmp_path, data_cache):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_rung(*args_for(blocker, data_cache, "x", SHORT, 1))
    assert_clean_failure(result, "not writable", str(blocker))


# Two real DeepSpeed workers (gloo, forked, no Ray): every torch.distributed collective is counted over one
# optimizer step of the same global batch in one micro-batch and in four.
COUNT_COLLECTIVES = r"""
import json, sys, torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rung.platform import runtime


class Batches:
    tokens = torch.randint(2048, (16, 129), generator=torch.Generator().manual_seed(0))

    def batch(self, step, rank, world_size):
        share = self.tokens[rank::world_size]
        return share[:, :-1], share[:, 1:]


def worker(rank, stage, init, out):
    runtime.configure_process()
    runtime.init_process_group(rank=rank, world_size=2, local_rank=rank, init_method=init)
    from rung.jobs.loading import load_run_config
    from rung.jobs.train.deepspeed_engine import build_engine, rung_clips
    from rung.jobs.train.guard import DivergenceGuard
    from rung.jobs.train.step import train_step

    calls = []
    for name in ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "reduce", "all_gather"):
        def counted(*args, _name=name, _call=getattr(dist, name), **kwargs):
            calls.append(_name)
            return _call(*args, **kwargs)
        setattr(dist, name, counted)
    counts = {}
    for micro in (8, 2):
        cfg = load_run_config("tiny", [f"train.zero_stage={stage}", "train.global_batch=16", "train.workers=2",
                                       f"train.micro_batch={micro}", "train.steps=4", "train.warmup_steps=1"])
        engine = build_engine(cfg, 2)
        guard = DivergenceGuard(cfg.train, computes_norm=rung_clips(cfg))
        train_step(engine, Batches(), 0, rank, 2, guard, cfg.train)
        calls.clear()
        train_step(engine, Batches(), 1, rank, 2, guard, cfg.train)
        counts[micro] = len(calls)
    if rank == 0:
        with open(out, "w") as file:
            json.dump(counts, file)


stage, out = int(sys.argv[1]), sys.argv[2]
mp.start_processes(worker, args=(stage, runtime.file_rendezvous(), out), nprocs=2, start_method="fork")
"""


@pytest.mark.parametrize("stage", [0, 1])
def test_gradient_accumulation_adds_no_collectives_at_zero_0_and_1(tmp_path, stage):
    """DeepSpeed reduces gradients once per optimizer step at ZeRO 0-1 (its no_sync behaviour): four micro-batches
    cost the collectives of one. ZeRO 2-3 reduce-scatter every micro-batch by design — the reduced partition is
    what saves their memory — so they are not held to it."""
    out = tmp_path / "counts.json"
    result = subprocess.run([sys.executable, "-c", COUNT_COLLECTIVES, str(stage), str(out)], cwd=REPO, text=True,
                            capture_output=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert counts["8"] > 0 and counts["2"] == counts["8"], counts
