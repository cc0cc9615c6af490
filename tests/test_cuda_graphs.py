"""CUDA graphs for decode steps and the KV pool sized from the device, without a GPU (none here). The graphs' size
choice, padding and static buffers run for real on this CPU: a stand-in for torch.cuda.CUDAGraph (the one mock here,
since capture needs a GPU) records the captured forward and reruns it on replay over the same static buffers, through
the Triton path under its interpreter — so greedy outputs replayed from padded graphs must equal transformers'. The
KV budget is plain arithmetic on byte counts, tested as such; the profiled forward runs on this CPU."""

from __future__ import annotations

import math

import pytest
import torch
from test_engine import MODELS, saved_reference, transformers_greedy

from rung.errors import ConfigError
from rung.serving.config import CPU_KV_CACHE_MEMORY, EngineConfig
from rung.serving.core.params import SamplingParams
from rung.serving.engine.llm import LLM
from rung.serving.worker.cuda_graphs import capture_sizes, graphs_blocked, padded_size
from rung.serving.worker.kv_sizing import (GIB, check_weights_fit, gpu_kv_budget, kv_cache_bytes, profile_forward,
                                           weight_bytes)
from rung.serving.worker.weights import load_weights


def test_graph_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(3) == [1, 2, 3] and capture_sizes(1) == [1]
    assert capture_sizes(256)[-3:] == [224, 240, 256] and len(capture_sizes(256)) == 4 + 16
    sizes = capture_sizes(64)
    assert [padded_size(sizes, n) for n in (1, 3, 5, 9, 17, 33, 64)] == [1, 4, 8, 16, 32, 48, 64]
    assert padded_size(sizes, 65) is None


def test_graphs_are_used_only_where_a_step_is_all_tensors():
    cuda = torch.device("cuda")
    assert graphs_blocked(cuda, "triton", 0, enforce_eager=False, deterministic=False) is None
    assert graphs_blocked(cuda, "triton", 0, enforce_eager=True, deterministic=False) == "--enforce-eager"
    assert "MoE" in graphs_blocked(cuda, "triton", 8, enforce_eager=False, deterministic=False)
    assert "--attention-backend triton" in graphs_blocked(cuda, "pytorch", 0, enforce_eager=False,
                                                          deterministic=False)
    assert graphs_blocked(torch.device("cpu"), "triton", 0, enforce_eager=False, deterministic=False)


class RecordedGraphs:
    """Stands in for torch.cuda.CUDAGraph capture (no GPU here): replay reruns the captured forward into the same
    output tensor, reading the static buffers as the graph would."""

    def __init__(self) -> None:
        self.replays: list[int] = []  # the output's address at every replay
        self.outputs: list[int] = []

    def __call__(self, forward):
        out = forward()
        self.outputs.append(out.data_ptr())

        def replay():
            self.replays.append(out.data_ptr())
            with torch.inference_mode():  # the output is an inference tensor, as the model made it
                out.copy_(forward())

        return replay, out


def test_padded_graph_replays_give_transformers_greedy_outputs(tmp_path):
    reference = saved_reference("llama-gqa1-tied", tmp_path)
    rng = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 211, (n,), generator=rng).tolist() for n in (1, 5, 9, 13, 3)]
    llm = LLM(tmp_path, num_blocks=40, block_size=4, max_num_seqs=5, max_num_batched_tokens=32,
              attention_backend="triton")
    runner = llm.engine.runner
    recorded = RecordedGraphs()
    runner.capture_graphs(5, recorded)
    graphs = runner.graphs
    assert graphs.sizes == [1, 2, 4, 5] and len(recorded.outputs) == 4
    buffers = graphs.token_ids.data_ptr(), graphs.layout.visible.data_ptr()
    # one prefill step, then decodes of 5, 4, 3 (replayed padded to 4), 2 and 2 requests as outputs end
    params = [SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True) for tokens in (6, 3, 6, 2, 4)]
    outputs = llm.generate(prompts, params)
    for prompt, param, output in zip(prompts, params, outputs):
        assert output[0].token_ids == transformers_greedy(reference, prompt, param.max_tokens), len(prompt)
    size_of = dict(zip(recorded.outputs, reversed(graphs.sizes)))  # captured largest first
    assert [size_of[address] for address in recorded.replays] == [5, 4, 4, 2, 2]
    assert (graphs.token_ids.data_ptr(), graphs.layout.visible.data_ptr()) == buffers
    keys = runner.cache[:, 0].view(runner.cache.shape[0], runner.model.spec.num_kv_heads,
                                   runner.model.spec.head_dim, -1)
    assert keys[..., graphs.pad_slot].abs().sum() > 0  # the padding rows wrote only to the padding slot
    assert keys[..., graphs.pad_slot + 1:].abs().sum() == 0


def test_the_kv_budget_is_the_share_left_after_weights_activations_and_others():
    total = 80 * GIB
    assert gpu_kv_budget(total, GIB // 2, 16 * GIB, 4 * GIB, 0.9) == int(0.9 * total) - GIB // 2 - 20 * GIB
    with pytest.raises(ConfigError, match="leaves no room for the KV cache: weights 70.00 GiB") as caught:
        gpu_kv_budget(total, GIB, 70 * GIB, 2 * GIB, 0.9)
    assert caught.value.field == "gpu_memory_utilization"
    with pytest.raises(ConfigError, match="weights alone take 140.0 GiB: the model does not fit"):
        check_weights_fit(140 * GIB, total, 0.9)
    check_weights_fit(70 * GIB, total, 0.9)


def test_weight_bytes_come_from_the_config_and_the_profiled_forward_runs(tmp_path):
    name = "llama-gqa1-tied"
    MODELS[name][0](MODELS[name][1]).save_pretrained(tmp_path)
    llm = LLM(tmp_path, num_blocks=8, block_size=4)
    spec = llm.engine.spec
    on_disk = sum(math.prod(t.shape) for t in load_weights(tmp_path).values())
    assert weight_bytes(spec, torch.bfloat16) == on_disk * 2
    logits = profile_forward(llm.engine.model, max_num_batched_tokens=60, max_num_seqs=8)
    assert logits.shape == (8, spec.vocab_size) and torch.isfinite(logits).all()
    assert kv_cache_bytes(llm.engine.model, EngineConfig()) == CPU_KV_CACHE_MEMORY
    assert kv_cache_bytes(llm.engine.model, EngineConfig(kv_cache_memory=12345)) == 12345
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        LLM(tmp_path, gpu_memory_utilization=0)
