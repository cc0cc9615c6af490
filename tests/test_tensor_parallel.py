"""Tensor-parallel serving on this CPU: two real processes with gloo between them, each holding half of the model.
Its outputs equal one process's and transformers'; each rank holds about half the weights; a dead worker is a
dead engine (503, /health fails, nothing hangs); and a size the model or machine cannot take is refused before any
worker starts."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import Server, assert_clean_failure, http, ray_head, run_rung
from test_engine import saved_reference, transformers_greedy

from rung.errors import ConfigError
from rung.serving.core.params import SamplingParams
from rung.serving.engine.llm import LLM
from rung.serving.worker.model_spec import load_spec
from rung.serving.worker.parallel.sharding import Shard, check_tensor_parallel, load_shard

WORKER = "rung.serving.worker.parallel.worker_process"


def prompts(seed: int = 1) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 211, (20,), generator=rng).tolist()
    found = [torch.randint(0, 211, (n,), generator=rng).tolist() for n in (1, 3, 17, 40, 90)]
    return found + [shared + [5], shared + [9, 9]]  # a shared prefix for the prefix cache


def generate(folder: Path, params: SamplingParams, **settings) -> tuple[list[list[list[int]]], LLM]:
    with LLM(folder, num_blocks=30, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, **settings) as llm:
        outputs = [[c.token_ids for c in completions] for completions in llm.generate(prompts(), params)]
    return outputs, llm


@pytest.mark.parametrize(("name", "nano_batches", "overlap"), [
    ("llama-gqa1-tied", 3, True),  # one KV head, fewer than the ranks: replicated; tied embeddings
    ("llama-gqa1-tied", 1, True),
    ("llama-headdim24", 3, False),  # two KV heads, as many as the ranks: split; every all-reduce waited for at once
    ("qwen2-bias", 3, True),
    ("mixtral", 3, True),
    ("granitemoe-shared", 3, True),  # Granite's multipliers, experts and a shared expert
])
def test_two_ranks_give_one_rank_and_transformers_greedy_tokens(name, nano_batches, overlap, tmp_path, monkeypatch):
    """With chunked prefill forced small, prefix caching, a pool small enough to preempt, and nano-batches whose
    all-reduces overlap the next one's compute (rank 0's steps seen split); a vocabulary (211) that two ranks split
    unevenly."""
    from rung.serving.worker.model import InferenceModel

    reference = saved_reference(name, tmp_path)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    single, _ = generate(tmp_path, params, nano_batches=nano_batches)
    splits, forward = [], InferenceModel.forward

    def recorded(model, *args, **kwargs):  # rank 0 computes in this process: what each of its steps was split into
        hidden = forward(model, *args, **kwargs)
        splits.append(model.last_nano_batches)
        return hidden

    monkeypatch.setattr(InferenceModel, "forward", recorded)
    split, llm = generate(tmp_path, params, nano_batches=nano_batches, tensor_parallel_size=2,
                          overlap_collectives=overlap)
    assert split == single
    for prompt, (output,) in zip(prompts(), split):
        assert output == transformers_greedy(reference, prompt, 12), (name, len(prompt))
    assert llm.scheduler.num_preemptions > 0 and llm.kv.prefix_hits > 0
    assert max(splits) == nano_batches and min(splits) == 1  # decode steps of one sequence stay whole


def test_shared_memory_sums_and_gathers_with_several_in_flight_and_notices_a_dead_peer(tmp_path):
    """Two ranks as two threads over one region: three all-reduces in flight at once come back summed (the same
    bits on both ranks), slots are reused past SLOTS, gathers land side by side on rank 0 between them, and a rank
    waiting on a peer that stopped fails quickly."""
    from rung.serving.worker.parallel.shared_memory import SLOTS, PeerGone, SharedMemoryCollectives, create_region

    region = tmp_path / "region"
    create_region(region, 2, 64)
    ranks = [SharedMemoryCollectives(region, rank, 2, 64, lambda: True) for rank in (0, 1)]
    inputs = [[torch.randn(4, 16) for _ in range(3 * SLOTS)] for _ in (0, 1)]
    results: list[list[torch.Tensor]] = [[], []]
    gathered: list[list[torch.Tensor | None]] = [[], []]

    def run(rank: int) -> None:
        tensors = [t.clone() for t in inputs[rank]]
        for batch in range(0, len(tensors), 3):
            pending = [ranks[rank].start(t) for t in tensors[batch:batch + 3]]
            for handle in pending:
                handle.wait()
            gathered[rank].append(ranks[rank].gather(inputs[rank][batch][:2]))
        results[rank] = tensors

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    for index in range(3 * SLOTS):
        expected = inputs[0][index] + inputs[1][index]
        assert torch.equal(results[0][index], expected) and torch.equal(results[1][index], expected)
    for index, batch in enumerate(range(0, 3 * SLOTS, 3)):
        assert torch.equal(gathered[0][index], torch.cat([inputs[0][batch][:2], inputs[1][batch][:2]], dim=-1))
        assert gathered[1][index] is None
    alone = SharedMemoryCollectives(region, 0, 2, 64, lambda: False)  # its peer never publishes again
    alone._number = ranks[0]._number
    started = time.monotonic()
    with pytest.raises(PeerGone):
        alone.start(torch.ones(4)).wait()
    assert time.monotonic() - started < 1


def test_without_room_in_dev_shm_the_ranks_sum_through_gloo(tmp_path, monkeypatch):
    import rung.serving.worker.parallel.workers as workers

    monkeypatch.setattr(workers, "_region_path", lambda size: None)
    saved_reference("qwen2-bias", tmp_path)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    split, llm = generate(tmp_path, params, tensor_parallel_size=2, nano_batches=2)
    assert llm.engine.model.group.shared is None
    assert split == generate(tmp_path, params)[0]
    assert not list(Path("/dev/shm").glob("rung-tp-*"))  # no region left behind by any test


def test_seeded_sampling_and_n_samples_equal_one_rank(tmp_path):
    saved_reference("mixtral", tmp_path)
    params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7, n=2, ignore_eos=True)
    single, _ = generate(tmp_path, params)
    split, _ = generate(tmp_path, params, tensor_parallel_size=2)
    assert split == single
    assert any(a != b for a, b in single)  # the two samples of a prompt differ: sampling, not greedy


def test_each_rank_reads_and_holds_about_half_the_weights(tmp_path):
    """Measured: the bytes each rank's loader reads from the safetensors file, and the bytes of the tensors each
    rank's model holds once loaded (reported to rank 0), against one process's."""
    saved_reference("llama-headdim24", tmp_path)
    spec = load_spec(tmp_path)
    whole = (tmp_path / "model.safetensors").stat().st_size
    for rank in (0, 1):
        _, shapes, read = load_shard(tmp_path, ["model.safetensors"], spec, Shard(rank, 2))
        stored = sum(t.numel() * t.element_size() for t in shapes.values())
        assert 0.45 * stored < read < 0.55 * stored and stored <= whole
    with LLM(tmp_path, num_blocks=16) as one:
        total = one.engine.model.weight_bytes
    with LLM(tmp_path, num_blocks=16, tensor_parallel_size=2) as two:
        held = two.engine.limits.rank_weight_bytes
    assert len(held) == 2 and all(0.45 * total < rank < 0.55 * total for rank in held), (held, total)


def test_sizes_the_model_or_machine_cannot_take_are_refused_naming_why(tmp_path):
    saved_reference("llama-headdim24", tmp_path)  # 4 heads, 2 KV heads, FFN 64
    spec = load_spec(tmp_path)
    cpu = torch.device("cpu")
    refusals = {3: "does not divide the model's attention heads (4)",
                len(os.sched_getaffinity(0)) + 1: "CPU cores"}
    for world, words in refusals.items():
        wide = replace(spec, num_heads=world * 4, num_kv_heads=world, intermediate_size=world * 16) \
            if words == "CPU cores" else spec
        with pytest.raises(ConfigError, match=words) as refused:
            check_tensor_parallel(wide, world, cpu)
        assert refused.value.field == "tensor_parallel_size"
    with pytest.raises(ConfigError, match="one must divide the other"):
        check_tensor_parallel(replace(spec, num_heads=6, num_kv_heads=3, intermediate_size=66), 2, cpu)
    with pytest.raises(ConfigError, match="deterministic mode is not supported"):
        LLM(tmp_path, tensor_parallel_size=2, deterministic=True)
    quantized = tmp_path / "quantized"
    shutil.copytree(tmp_path, quantized, ignore=shutil.ignore_patterns("quantized"))
    config = json.loads((quantized / "config.json").read_text())
    (quantized / "config.json").write_text(json.dumps({**config, "quantization_config": {"format": "x"}}))
    before = worker_pids()
    with pytest.raises(ConfigError, match="quantized folder"):
        LLM(quantized, tensor_parallel_size=2)
    assert worker_pids() == before  # refused before any worker started


def test_with_vllm_the_size_passes_through_and_rung_only_settings_are_refused():
    from rung.serving.config import serve_config

    config = serve_config({"model_dir": "m", "backend": "vllm", "tensor_parallel_size": 2})
    assert config.engine.tensor_parallel_size == 2
    for setting in ({"overlap_collectives": False}, {"distributed_backend": "ray"}):
        with pytest.raises(ConfigError, match="applies to rung's engine only"):
            serve_config({"model_dir": "m", "backend": "vllm", "tensor_parallel_size": 2, **setting})


def worker_pids(parent: int | None = None) -> set[int]:
    """The tensor-parallel worker processes running now (those under `parent`'s tree, when given)."""
    found = set()
    for line in subprocess.run(["pgrep", "-a", "-f", WORKER], capture_output=True, text=True).stdout.splitlines():
        pid = int(line.split()[0])
        ancestors, walk = set(), pid
        while walk > 1:
            walk = int(Path(f"/proc/{walk}/stat").read_text().rsplit(")", 1)[1].split()[1]) \
                if Path(f"/proc/{walk}/stat").exists() else 1
            ancestors.add(walk)
        if parent is None or parent in ancestors:
            found.add(pid)
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie left for init to reap."""
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_bad_tensor_parallel_flags_exit_2_before_any_worker_starts(model_dir):
    for flags, words in ((["--tensor-parallel-size", "3"], "does not divide"),
                         (["--tensor-parallel-size", "2", "--deterministic"], "deterministic mode"),
                         (["--tensor-parallel-size", "0"], "at least 1"),
                         (["--tensor-parallel-size", "2", "--tune"], "without --tensor-parallel-size")):
        result = run_rung("serve", str(model_dir), *flags, timeout=120)
        assert_clean_failure(result, "--tensor-parallel-size", words)
        assert result.returncode == 2


def test_a_served_model_split_over_two_ranks_fails_loudly_when_a_worker_dies(model_dir, tmp_path):
    """Streams and plain requests work across two ranks; a worker SIGKILLed while two long requests run ends both
    with a 503 (an error event for the stream) naming it, /health fails, and stopping the server leaves no worker
    behind."""
    from http.client import HTTPConnection

    folder = tmp_path / "model"  # a context long enough for requests that outlast the kill
    shutil.copytree(model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    server = Server(folder, tmp_path / "serve.log", "--tensor-parallel-size", "2", "--nano-batches", "2")
    results: dict[bool, tuple[int, str]] = {}

    def long_request(stream: bool) -> None:
        connection = HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request("POST", "/v1/completions", json.dumps(
            {"model": "tiny", "prompt": "def", "max_tokens": 4000, "ignore_eos": True, "stream": stream}),
            {"Content-Type": "application/json"})
        response = connection.getresponse()
        results[stream] = (response.status, response.read().decode())

    try:
        assert "tensor-parallel over 2 ranks" in (tmp_path / "serve.log").read_text()
        body = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}
        status, _, text = http("POST", f"{server.url}/v1/completions", body)
        assert status == 200 and json.loads(text)["usage"]["completion_tokens"] == 8, text
        threads = [threading.Thread(target=long_request, args=(stream,)) for stream in (True, False)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while server.metrics()['rung_serve_requests_running{model_name="tiny"}'] < 2 and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        workers = worker_pids(server.process.pid)
        assert len(workers) == 1, workers
        os.kill(workers.pop(), signal.SIGKILL)
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)  # nothing hangs
        streamed, plain = results[True], results[False]
        assert streamed[0] == 200 and "tensor-parallel worker 1" in streamed[1] and \
            streamed[1].rstrip().endswith("data: [DONE]"), streamed
        assert plain[0] == 503 and json.loads(plain[1])["error"]["type"] == "service_unavailable", plain
        assert http("GET", f"{server.url}/health")[0] == 503
        status, _, text = http("POST", f"{server.url}/v1/completions", body)
        error = json.loads(text)["error"]
        assert status == 503 and "tensor-parallel worker 1" in error["message"], text
    finally:
        server.stop()
    assert server.process.returncode is not None and not worker_pids(server.process.pid)


def test_sigterm_drains_a_tensor_parallel_server_and_stops_its_workers(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "serve.log", "--tensor-parallel-size", "2")
    pid = server.process.pid
    try:
        workers = worker_pids(pid)
        assert len(workers) == 1
        status, _, text = http("POST", f"{server.url}/v1/completions",
                               {"model": "tiny", "prompt": "x", "max_tokens": 4, "ignore_eos": True})
        assert status == 200, text
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0
        deadline = time.monotonic() + 10
        while any(map(alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(alive, workers))
    finally:
        server.stop()


RAY_SCRIPT = """
import json, sys
from rung.errors import ConfigError
from rung.serving.core.params import SamplingParams
from rung.serving.engine.llm import LLM
folder, prompts = sys.argv[1], json.loads(sys.argv[2])
try:
    LLM(folder, tensor_parallel_size=4, distributed_backend="ray")
except ConfigError as err:
    print(json.dumps({"refused": str(err)}))
with LLM(folder, num_blocks=30, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, tensor_parallel_size=2,
         distributed_backend="ray") as llm:
    outputs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    print(json.dumps({"tokens": [[c.token_ids for c in o] for o in outputs],
                      "held": llm.engine.limits.rank_weight_bytes}))
"""


def test_workers_placed_by_ray_give_the_same_tokens(tmp_path):
    """`distributed_backend="ray"` against a real Ray cluster (2 CPUs): the worker is an actor in a placement-group
    bundle, reached over TCP; a split needing more workers than the cluster has CPUs is refused before any starts."""
    saved_reference("llama-headdim24", tmp_path)
    single, _ = generate(tmp_path, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    with ray_head() as head:
        result = subprocess.run([sys.executable, "-c", RAY_SCRIPT, str(tmp_path), json.dumps(prompts())],
                                env={**os.environ, **head.env, "RAY_ADDRESS": head.gcs}, capture_output=True,
                                text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert "3 workers need 3 CPUs in the Ray cluster, which has 2" in lines[0]["refused"]
    assert lines[1]["tokens"] == single and len(lines[1]["held"]) == 2
