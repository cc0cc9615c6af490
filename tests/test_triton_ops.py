"""The Triton compute path on this CPU, under Triton's interpreter (no GPU here: the same kernels compile on one):
paged attention of a packed step against the PyTorch reference — decodes and prefill chunks, GQA ratios, head dims
that are and are not powers of two, fp32 and bf16, contexts of 1-2,000 tokens in block tables with holes and blocks
shared by two requests —, the RMSNorm, rotary and KV-write kernels against theirs, greedy outputs through
`LLM(..., attention_backend="triton")` equal transformers', and `rung serve --attention-backend triton` answers the
OpenAI client as the reference path does. conftest.py sets TRITON_INTERPRET=1 before anything
imports Triton."""

from __future__ import annotations

import random

import pytest
import torch
from test_engine import MODELS, saved_reference, transformers_greedy

from rung.errors import ConfigError
from rung.serving.core.params import SamplingParams
from rung.serving.engine.llm import LLM
from rung.serving.worker.ops.torch_ops import TorchOps
from rung.serving.worker.step import StepInputs

BLOCK = 16


def packed_step(spans_spec: list[tuple[int, int]], slots: int, shared_blocks: int, seed: int) -> StepInputs:
    """Spans of (query rows, context tokens) whose blocks sit at random places of the pool (so contexts are several
    runs, with holes between them); every span after the first begins with the first span's `shared_blocks`."""
    rng = random.Random(seed)
    free = list(range(slots // BLOCK))
    rng.shuffle(free)
    spans, first, shared = [], 0, []
    for index, (rows, context) in enumerate(spans_spec):
        blocks = list(shared[:min(shared_blocks, -(-context // BLOCK))]) if index else []
        while len(blocks) * BLOCK < context:
            blocks.append(free.pop())
        shared = shared or blocks
        runs = [slice(b * BLOCK, b * BLOCK + min(BLOCK, context - i * BLOCK)) for i, b in enumerate(blocks)]
        spans.append((first, rows, runs))
        first += rows
    empty = torch.zeros(first, dtype=torch.long)
    return StepInputs(empty, empty, empty, spans)


@pytest.mark.parametrize("kv_heads, group, head_dim, dtype, spans, tolerance", [
    (2, 2, 64, torch.float32, [(1, 40), (1, 7), (5, 20), (16, 16)], 1e-5),  # decodes and prefills mixed
    (1, 4, 96, torch.float32, [(1, 300), (17, 17), (3, 290)], 1e-5),  # head dim not a power of two
    (4, 1, 128, torch.bfloat16, [(1, 1), (3, 50), (1, 130)], 2e-2),
    (2, 3, 32, torch.float32, [(1, 2000), (1, 1999)], 1e-5),  # long contexts sharing 100 blocks
])
def test_the_kernel_equals_the_pytorch_reference(kv_heads, group, head_dim, dtype, spans, tolerance):
    from rung.serving.worker.ops.triton_ops import TritonOps

    slots = 8192
    generator = torch.Generator().manual_seed(0)
    cache = torch.randn(2, kv_heads, (slots + 32) * head_dim, generator=generator).to(dtype)
    keys, values = cache[0].view(kv_heads, head_dim, -1), cache[1].view(kv_heads, -1, head_dim)
    step = packed_step(spans, slots, shared_blocks=100, seed=head_dim)
    q = (torch.randn(len(step.token_ids), kv_heads * group, head_dim, generator=generator) * head_dim ** -0.5).to(dtype)
    ops = TritonOps()
    ops.prepare(step)
    torch.testing.assert_close(ops.attention(q, keys, values, step).float(),
                               TorchOps().attention(q, keys, values, step).float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("tokens, heads, kv_heads, head_dim, dtype, tolerance", [
    (7, 4, 2, 64, torch.float32, 1e-5), (5, 6, 1, 96, torch.float32, 1e-5), (9, 8, 8, 128, torch.bfloat16, 2e-2),
    (1, 2, 2, 256, torch.float16, 2e-3),
])
def test_the_norm_rotary_and_kv_write_kernels_equal_the_pytorch_reference(tokens, heads, kv_heads, head_dim, dtype,
                                                                          tolerance):
    from rung.serving.worker.ops.torch_ops import rope_tables
    from rung.serving.worker.ops.triton_ops import TritonOps

    triton_ops, torch_ops = TritonOps(), TorchOps()
    generator = torch.Generator().manual_seed(head_dim)
    width = heads * head_dim
    x = torch.randn(tokens, width, generator=generator).to(dtype) * 3
    weight = torch.randn(width, generator=generator).to(dtype)
    torch.testing.assert_close(triton_ops.rms_norm(x, weight, 1e-5), torch_ops.rms_norm(x, weight, 1e-5),
                               atol=tolerance, rtol=tolerance)

    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
    cos, sin = rope_tables(torch.randint(0, 3000, (tokens,), generator=generator), head_dim, 10000.0)
    expected = torch_ops.rotary(qkv[:, :heads + kv_heads].clone(), cos, sin)
    rotated = triton_ops.rotary(qkv[:, :heads + kv_heads], cos, sin)  # a strided view, rotated in place
    assert rotated.data_ptr() == qkv.data_ptr()
    torch.testing.assert_close(qkv[:, :heads + kv_heads], expected, atol=tolerance, rtol=tolerance)

    slots = torch.randperm(200, generator=generator)[:tokens]
    pools = [torch.zeros(2, kv_heads, 232 * head_dim, dtype=dtype) for _ in range(2)]
    for ops, pool in zip((triton_ops, torch_ops), pools):
        k, v = qkv[:, heads:heads + kv_heads], qkv[:, heads + kv_heads:]
        ops.write_kv(k, v, pool[0].view(kv_heads, head_dim, -1), pool[1].view(kv_heads, -1, head_dim), slots)
    assert torch.equal(pools[0], pools[1]) and pools[0].abs().sum() > 0


@pytest.mark.parametrize("name", ["llama-gqa1-tied", "qwen2-bias", "mixtral", "granite"])
def test_greedy_outputs_through_the_triton_path_equal_transformers(name, tmp_path, monkeypatch):
    """In two nano-batches: the runner builds each nano-batch's layout ahead, and the model runs those very parts."""
    reference = saved_reference(name, tmp_path)
    rng = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 211, (12,), generator=rng).tolist()
    prompts = [torch.randint(0, 211, (n,), generator=rng).tolist() for n in (1, 9, 30)] + [shared + [5], shared]
    engine = LLM(tmp_path, num_blocks=40, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                 attention_backend="triton", nano_batches=2)
    model = engine.engine.model
    assert model.ops.name == "triton"
    prepared, forwarded, ran = [], [], []
    prepare, forward, attention = model.ops.prepare, model.forward, model._attention_block
    monkeypatch.setattr(model.ops, "prepare", lambda step: prepared.append(step) or prepare(step))
    monkeypatch.setattr(model, "forward", lambda step, *rest: forwarded.append(step) or forward(step, *rest))
    monkeypatch.setattr(model, "_attention_block", lambda x, layer, step, *rest: ran.append(step) or
                        attention(x, layer, step, *rest))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    for prompt, output in zip(prompts, outputs):
        assert output[0].token_ids == transformers_greedy(reference, prompt, 6), (name, len(prompt))
    assert engine.kv.prefix_hits > 0
    assert {id(step) for step in ran} == {id(step) for step in prepared}  # nothing built that does not run
    assert all(step.layout is not None for step in prepared)
    assert any(id(step) not in map(id, prepared) for step in forwarded)  # steps were split, and their parts prepared


def test_rung_serve_on_the_triton_path_answers_the_openai_client_as_the_reference_path(model_dir, tmp_path):
    """`rung serve --device cpu --attention-backend triton` under the interpreter (inherited from conftest): the
    OpenAI client gets the greedy text the PyTorch reference path computes offline, streamed and not."""
    import openai
    from conftest import Server
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = ["def add(a, b):", "import"]
    offline = LLM(model_dir, attention_backend="torch").generate(
        [tokenizer(p)["input_ids"] for p in prompts], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    server = Server(model_dir, tmp_path / "serve.log", "--device", "cpu", "--attention-backend", "triton",
                    "--max-num-seqs", "2")
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
        response = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
        texts = [choice.text for choice in sorted(response.choices, key=lambda choice: choice.index)]
        assert texts == [tokenizer.decode(output[0].token_ids) for output in offline]
        stream = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=8, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        assert "".join(chunk.choices[0].text for chunk in stream) == texts[0]
    finally:
        server.stop()


def test_the_triton_path_is_refused_where_it_cannot_run(tmp_path, monkeypatch):
    cls, config = MODELS["qwen2-bias"]
    cls(config).save_pretrained(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="attention_backend.*TRITON_INTERPRET=1"):
        LLM(tmp_path, num_blocks=8, block_size=4, attention_backend="triton")
    from rung.serving.worker.ops.select import select_ops

    with pytest.raises(ConfigError, match="attention_backend.*--device cpu"):
        select_ops(torch.device("cuda"), "cpu")  # decided before any CUDA call: no GPU is needed to test it
    with pytest.raises(ConfigError, match="attention_backend"):
        LLM(tmp_path, num_blocks=8, block_size=4, attention_backend="cuda-graphs")
    from rung.serving.worker.ops.triton_ops import TritonOps

    with pytest.raises(ConfigError, match="head dims up to 256; this model's is 320"):
        TritonOps().check_model(320)
