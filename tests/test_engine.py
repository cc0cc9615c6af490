"""The engine's greedy outputs equal transformers' token for token, for several architectures and shapes, with
chunked prefill forced small, prefix caching on and a KV pool small enough to force preemption, with async
scheduling (the default) and without."""

from __future__ import annotations

import pytest
import torch
from transformers import (GraniteConfig, GraniteForCausalLM, GraniteMoeConfig, GraniteMoeForCausalLM,
                          GraniteMoeSharedConfig, GraniteMoeSharedForCausalLM, LlamaConfig, LlamaForCausalLM,
                          MixtralConfig, MixtralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from rung.errors import RungError
from rung.serving.core.params import SamplingParams
from rung.serving.engine.llm import LLM
from rung.serving.worker.ops.torch_ops import RUNS_READ_IN_PLACE

COMMON = dict(vocab_size=211, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-5)
MODELS = {
    "llama-gqa1-tied": (LlamaForCausalLM, LlamaConfig(**COMMON, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-headdim24": (LlamaForCausalLM, LlamaConfig(**{**COMMON, "hidden_size": 96}, num_key_value_heads=2,
                                                      head_dim=24)),
    "qwen2-bias": (Qwen2ForCausalLM, Qwen2Config(**COMMON, num_key_value_heads=2)),
    "mixtral": (MixtralForCausalLM, MixtralConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                                  num_experts_per_tok=2)),
    "granite": (GraniteForCausalLM, GraniteConfig(**COMMON, num_key_value_heads=2, embedding_multiplier=3.0,
                                                  residual_multiplier=0.5, attention_multiplier=0.2,
                                                  logits_scaling=2.0)),
    "granitemoe": (GraniteMoeForCausalLM, GraniteMoeConfig(**COMMON, num_key_value_heads=2, num_local_experts=4,
                                                           num_experts_per_tok=2, embedding_multiplier=3.0,
                                                           residual_multiplier=0.5, attention_multiplier=0.2,
                                                           logits_scaling=2.0)),
    "granitemoe-shared": (GraniteMoeSharedForCausalLM, GraniteMoeSharedConfig(
        **COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=32,
        embedding_multiplier=2.0, residual_multiplier=0.7, attention_multiplier=0.25, logits_scaling=1.5)),
}


def saved_reference(name: str, folder, **config_changes):
    """The transformers model `name` (MODELS), seeded, with weights 4x the default init (greedy paths are less
    degenerate), saved to `folder`."""
    cls, config = MODELS[name]
    config = type(config)(**{**config.to_dict(), **config_changes}) if config_changes else config
    torch.manual_seed(0)
    reference = cls(config).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.mul_(4.0) if param.dim() > 1 else None
    reference.save_pretrained(folder)
    return reference


def transformers_greedy(reference, prompt: list[int], tokens: int) -> list[int]:
    """transformers' greedy continuation of `prompt`, exactly `tokens` long."""
    with torch.no_grad():
        ids = torch.tensor([prompt])  # an explicit mask: generate would otherwise mask every token equal to pad
        return reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("nano_batches", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_greedy_outputs_equal_transformers(name, nano_batches, async_scheduling, tmp_path):
    reference = saved_reference(name, tmp_path)
    rng = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 211, (20,), generator=rng).tolist()
    prompts = [torch.randint(0, 211, (n,), generator=rng).tolist() for n in (1, 3, 17, 40, 90)]
    prompts += [shared + [5], shared + [9, 9]]  # a shared prefix for the prefix cache
    engine = LLM(tmp_path, num_blocks=30, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                 nano_batches=nano_batches, async_scheduling=async_scheduling)
    outputs = [c[0].token_ids for c in engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0,
                                                                                ignore_eos=True))]
    for prompt, output in zip(prompts, outputs):
        assert output == transformers_greedy(reference, prompt, 12), (name, len(prompt))
    assert engine.scheduler.num_preemptions > 0 and engine.kv.prefix_hits > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_bad_requests_and_folders(tmp_path):
    cls, config = MODELS["qwen2-bias"]
    cls(config).save_pretrained(tmp_path)
    engine = LLM(tmp_path, num_blocks=8, block_size=4)
    with pytest.raises(RungError, match="context window"):
        engine.generate([[1] * 250], SamplingParams(max_tokens=10))
    with pytest.raises(RungError, match="whole KV cache"):
        engine.generate([[1] * 30], SamplingParams(max_tokens=10))
    with pytest.raises(RungError, match="token ids"):
        engine.generate([[1, 500]])
    with pytest.raises(RungError, match="no config.json"):
        LLM(tmp_path / "nowhere")
    with pytest.raises(RungError, match="^max_num_seqs: must be at least 1, got 0"):  # checked as every config is
        LLM(tmp_path, max_num_seqs=0)
    with pytest.raises(RungError, match="^nano_batch: unknown field"):
        LLM(tmp_path, nano_batch=2)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["model.layers.1.self_attn.k_proj.weight"] = weights["model.layers.1.self_attn.k_proj.weight"][:8]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RungError, match=r"k_proj.weight is \(8, 48\), the config implies \(24, 48\)"):
        LLM(tmp_path)
    del weights["model.layers.0.mlp.up_proj.weight"], weights["model.norm.weight"]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RungError, match="missing model.norm.weight"):
        LLM(tmp_path)


def test_n_samples_share_the_prompt_and_seeds_reproduce_in_a_busy_batch(tmp_path):
    cls, config = MODELS["mixtral"]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    engine = LLM(tmp_path, num_blocks=64, block_size=4)
    prompt = list(range(1, 30))
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=3, ignore_eos=True, logprobs=0)
    alone = engine.generate([prompt], params)[0]
    busy = engine.generate([list(range(50, 60)), prompt, [7] * 40], params)[1]
    assert [c.token_ids for c in alone] == [c.token_ids for c in busy]  # per-request streams: batch-invariant
    assert len({tuple(c.token_ids) for c in alone}) > 1  # the n samples differ
    assert all(len(c.logprobs) == 8 and all(lp <= 0 for lp in c.logprobs) for c in alone)
    assert engine.kv.prefix_hits > 0 and engine.kv.num_free_blocks == engine.kv.num_blocks


BACKENDS = {"kernels": "cpu", "pytorch": "torch"}  # the engine's attention_backend for each compute path


def built_with(engine: LLM, ops: str) -> LLM:
    """The engine, having checked it runs the compute path asked for (`make install` builds the kernels)."""
    assert engine.engine.model.ops.name == ("cpu-kernels" if ops == "kernels" else "pytorch"), engine.engine.model.ops
    return engine


@pytest.mark.parametrize("ops", ["kernels", "pytorch"])
def test_deterministic_mode_is_batch_invariant_to_the_bit(ops, tmp_path):
    cls, config = MODELS["mixtral"]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    engine = built_with(LLM(tmp_path, num_blocks=128, block_size=4, max_num_batched_tokens=32, deterministic=True,
                            attention_backend=BACKENDS[ops]), ops)
    prompt = list(range(1, 45))  # longer than a chunk: chunked at the same boundaries alone and in company
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=5, ignore_eos=True, logprobs=0)
    alone = engine.generate([prompt], params)[0][0]
    rng = torch.Generator().manual_seed(3)
    company = [torch.randint(0, 211, (n,), generator=rng).tolist() for n in (3, 30, 7, 60, 12)]
    busy = engine.generate(company[:2] + [prompt] + company[2:], params)[2][0]
    assert busy.token_ids == alone.token_ids
    assert busy.logprobs == alone.logprobs  # bitwise, not approximately
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_nano_batches_split_whole_spans_in_order():
    from rung.serving.worker.model import StepInputs

    spans = [(0, 5, [slice(0, 5)]), (5, 1, [slice(8, 17)]), (6, 1, [slice(20, 23)]), (7, 9, [slice(30, 39)])]
    step = StepInputs(torch.arange(16), torch.arange(16), torch.arange(16), spans)
    parts = step.split(3)
    assert [p[0] for p in parts] == [slice(0, 5), slice(5, 7), slice(7, 16)]
    assert [[s[:2] for s in p[1].spans] for p in parts] == [[(0, 5)], [(0, 1), (1, 1)], [(0, 9)]]
    assert torch.equal(parts[2][1].positions, torch.arange(7, 16))
    assert len(step.split(10)) == 4  # never more parts than spans


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_serving_tracks_fp32(dtype, tmp_path):
    """bf16/fp16 weights and KV cache: the greedy path stays close to fp32's (exact equality is not expected)."""
    cls, config = MODELS["llama-headdim24"]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    prompts = [list(range(1, 40)), list(range(50, 60))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)
    full = LLM(tmp_path, num_blocks=64, block_size=4).generate(prompts, params)
    half = LLM(tmp_path, num_blocks=64, block_size=4, dtype=dtype).generate(prompts, params)
    for a, b in zip(full, half):
        assert a[0].token_ids[:4] == b[0].token_ids[:4]  # the first tokens agree; later ones may drift
        assert abs(a[0].logprobs[0] - b[0].logprobs[0]) < 0.1


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_that_emulates_it_is_warned_about(native, tmp_path, monkeypatch, caplog):
    """The probe reads this CPU's flags as Linux lists them; the answer is then set both ways (a CPU with and without
    AVX-512 BF16 / AMX cannot both be here), and only the emulating CPU's bf16 engine warns."""
    from pathlib import Path

    from rung.serving.worker import runner
    from rung.platform.cpu_features import native_bf16

    flags = set(Path("/proc/cpuinfo").read_text().split())
    assert native_bf16() == bool({"avx512_bf16", "amx_tile"} & flags)
    monkeypatch.setattr(runner, "native_bf16", lambda: native)
    cls, config = MODELS["llama-headdim24"]
    cls(config).save_pretrained(tmp_path)
    for dtype in ("bfloat16", "float32"):
        caplog.clear()
        LLM(tmp_path, num_blocks=8, block_size=4, dtype=dtype)
        warned = [r for r in caplog.records if "without AVX-512 BF16 or AMX" in r.getMessage()]
        assert bool(warned) == (dtype == "bfloat16" and not native), dtype


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("ops", ["kernels", "pytorch"])
@pytest.mark.parametrize("nano_batches", [1, 3])
@pytest.mark.parametrize("name", ["llama-headdim24", "mixtral"])
def test_32_concurrent_requests_of_1_to_300_tokens_match_transformers(name, nano_batches, ops, async_scheduling,
                                                                      tmp_path, monkeypatch):
    """The acceptance matrix: 32 requests at once, prompts of 1-300 tokens (some sharing a prefix), chunked prefill
    forced small, prefix caching on, and a KV pool far smaller than the batch needs (preemption), through rung's
    compiled kernels and through PyTorch's operators. Contexts sit in one run of consecutive blocks, in a few (read
    in place by PyTorch) and in many (copied into one by PyTorch; the kernel walks them all)."""
    from rung.serving.worker.runner import ModelRunner

    counts, runs = set(), ModelRunner._runs
    monkeypatch.setattr(ModelRunner, "_runs", lambda self, *a: counts.add(len(found := runs(self, *a))) or found)
    reference = saved_reference(name, tmp_path, max_position_embeddings=512)
    rng = torch.Generator().manual_seed(2)
    lengths = [1, 2, 300, 299] + torch.randint(3, 300, (24,), generator=rng).tolist()
    prompts = [torch.randint(0, 211, (n,), generator=rng).tolist() for n in lengths]
    shared = prompts[2][:64]
    prompts += [shared + [1], shared + [2, 3], shared[:40], shared + prompts[5][:10]]
    assert len(prompts) == 32 and min(map(len, prompts)) == 1 and max(map(len, prompts)) == 300
    engine = built_with(LLM(tmp_path, num_blocks=160, block_size=4, max_num_seqs=16, max_num_batched_tokens=64,
                            nano_batches=nano_batches, async_scheduling=async_scheduling,
                            attention_backend=BACKENDS[ops]), ops)
    outputs = engine.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert output[0].token_ids == transformers_greedy(reference, prompt, 8), (name, len(prompt))
    assert engine.scheduler.num_preemptions > 0 and engine.kv.prefix_hits > 0
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    assert {1, 2} <= counts and max(counts) > RUNS_READ_IN_PLACE, counts


@pytest.mark.parametrize("width", [16, 6])  # 16 fp32 columns: torch's grouped GEMM; 6 (24-byte rows): per-expert
def test_grouped_matmul_gives_each_expert_its_own_rows(width):
    from rung.serving.worker.ops.torch_ops import grouped_matmul

    rng = torch.Generator().manual_seed(5)
    x, weights = torch.randn(20, 8, generator=rng), torch.randn(3, 8, width, generator=rng)
    ends = torch.tensor([5, 5, 20], dtype=torch.int32)  # expert 1 gets no rows
    expected = torch.cat([x[:5] @ weights[0], x[5:] @ weights[2]])
    torch.testing.assert_close(grouped_matmul(x, weights, ends), expected)


def test_async_scheduling_matches_sync_through_stops_penalties_seeds_and_aborts(tmp_path, monkeypatch):
    """Step i+1 is planned before step i's tokens are known. Requests that stop at a stop token (planned into the
    next step already), penalties that must see the token still in flight, seeded sampling, and aborts while a step
    computes all give what the synchronous engine gives, and every block and sampler stream is returned."""
    from rung.serving.core.scheduler import Scheduler

    in_flight_preemptions, preempt = [], Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, request, plan: (
        preempt(self, request, plan), in_flight_preemptions.append(request.num_pending))[0])
    cls, config = MODELS["llama-gqa1-tied"]
    torch.manual_seed(0)
    reference = cls(config)
    with torch.no_grad():
        for param in reference.parameters():
            param.mul_(4.0) if param.dim() > 1 else None
    reference.save_pretrained(tmp_path)
    rng = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 211, (n,), generator=rng).tolist() for n in (1, 5, 33, 70, 12, 9)]
    greedy = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    free_run = LLM(tmp_path, num_blocks=64, block_size=4, async_scheduling=False).generate(prompts, greedy)
    stops = [c[0].token_ids[3] for c in free_run]  # each request meets its stop token by its 4th token

    def run(async_scheduling: bool) -> tuple[dict[str, list[int]], LLM]:
        llm = LLM(tmp_path, num_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=24,
                  async_scheduling=async_scheduling)
        for index, prompt in enumerate(prompts):
            llm.engine.add(f"stop{index}", prompt, SamplingParams(max_tokens=14, temperature=0,
                                                                  stop_token_ids=[stops[index]]))
            llm.engine.add(f"pen{index}", prompt, SamplingParams(max_tokens=9, temperature=0.9, seed=index,
                                                                 repetition_penalty=1.3, presence_penalty=0.5,
                                                                 frequency_penalty=0.4, ignore_eos=True))
        llm.engine.add("aborted", prompts[3], greedy)
        tokens: dict[str, list[int]] = {}
        steps = 0
        while llm.engine.has_work:
            for event in llm.engine.step():
                tokens.setdefault(event.request_id, []).append(event.token_id)
            steps += 1
            if len(tokens.get("aborted", [])) == 2:
                llm.engine.abort("aborted")  # under async scheduling its next step is computing now
        assert llm.kv.num_free_blocks == llm.kv.num_blocks and not llm.engine.runner.sampler._generators
        return tokens, llm

    sync, _ = run(False)
    assert in_flight_preemptions and not any(in_flight_preemptions)  # synchronous: nothing is ever in flight
    in_flight_preemptions.clear()
    overlapped, _ = run(True)
    assert any(in_flight_preemptions)  # preempted while a token of theirs was being sampled
    assert overlapped.pop("aborted") == sync.pop("aborted") == free_run[3][0].token_ids[:2]
    assert overlapped == sync
    for index, completion in enumerate(free_run):
        stopped = sync[f"stop{index}"]
        assert stopped[-1] == stops[index] and len(stopped) <= 4 and stopped == completion[0].token_ids[:len(stopped)]


def test_an_exact_repeat_finds_its_prefixes_in_the_cache_through_the_engine(tmp_path):
    cls, config = MODELS["llama-gqa1-tied"]
    torch.manual_seed(0)
    cls(config).save_pretrained(tmp_path)
    engine = LLM(tmp_path, num_blocks=1200, block_size=4, max_num_seqs=8)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, config.vocab_size, (int(n),), generator=generator).tolist()
               for n in torch.randint(10, 60, (64,), generator=generator)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    first = engine.generate(prompts, params)
    queries, hits = engine.kv.prefix_queries, engine.kv.prefix_hits
    repeat = engine.generate(prompts, params)
    repeat_queries, repeat_hits = engine.kv.prefix_queries - queries, engine.kv.prefix_hits - hits
    assert repeat_queries > 300 and repeat_hits >= 0.9 * repeat_queries, (repeat_hits, repeat_queries)
    assert [c[0].token_ids for c in repeat] == [c[0].token_ids for c in first]  # the cached KV is the same KV
    uncached = LLM(tmp_path, num_blocks=1200, block_size=4, max_num_seqs=8, enable_prefix_caching=False)
    assert [c[0].token_ids for c in uncached.generate(prompts, params)] == [c[0].token_ids for c in first]
    assert [c[0].token_ids for c in uncached.generate(prompts, params)] == [c[0].token_ids for c in first]
    assert uncached.kv.prefix_queries == uncached.kv.prefix_hits == 0  # --no-prefix-caching: nothing looked up
