"""Low-bit weights (`--quantization int8|int4`, `rung quantize`): the levels' error bounds; the C++ integer kernel
against the arithmetic it implements, and the Triton kernel (under its interpreter) against the weight-only
product; the PyTorch and Triton paths against transformers running the dequantized model; a quantized model served
through the OpenAI API with streaming, n > 1, prefix caching and preemption; `rung eval`'s perplexity against
transformers'; the mixed allocation on a model built with one sensitive layer, its folder loading back identically
in rung and in transformers (compressed-tensors); and bad input refused."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from conftest import Server, assert_clean_failure, http, run_rung
from test_engine import saved_reference, transformers_greedy

from rung.errors import ConfigError, RungError
from rung.serving.core.params import SamplingParams
from rung.serving.engine.llm import LLM
from rung.serving.worker.ops import cpu_kernels
from rung.serving.worker.ops.cpu_ops import CpuKernelOps, PackedQuantized
from rung.serving.worker.ops.torch_ops import TorchOps
from rung.serving.worker.quantization import LARGEST, quantize

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_mlp.input_linear",
               "shared_mlp.output_linear")  # the linear layers the engine quantizes (and MoE experts); routers stay


@pytest.mark.parametrize("bits, group", [(8, 128), (4, 32), (4, 128)])
def test_every_weight_is_within_half_a_scale_of_its_level(bits, group):
    rows, features = 96, 256
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, features, generator=generator) * torch.logspace(-3, 1, rows)[:, None]  # 4 decades
    weight[5] = 0.0
    q = quantize(weight, bits, group)
    size = features if bits == 8 else group
    assert q.q.dtype == torch.int8 and q.group_size == size and q.scales.shape == (rows, features // size)
    assert q.q.abs().max() <= LARGEST[bits]
    error = (q.dequantize() - weight).abs().view(rows, -1, size)
    # half a scale, plus fp32's rounding of w / scale and of level × scale (a few ulps of the largest level's value)
    assert (error <= q.scales[:, :, None] * (0.5 + LARGEST[bits] * 2.0 ** -21)).all()
    assert torch.equal(q.dequantize()[5], torch.zeros(features))  # an all-zero row stays exact
    largest = q.q.view(rows, -1, size).abs().amax(-1)
    assert (largest[torch.arange(rows) != 5] == LARGEST[bits]).all()  # no level wasted, none clipped
    assert q.nbytes == rows * features * bits // 8 + q.scales.numel() * 4


def integer_arithmetic(x: torch.Tensor, q) -> torch.Tensor:
    """What the integer kernel computes: each row of x at int8 levels with its own scale, exact integer products,
    the weight's scales applied per output row and group (in float64 here)."""
    scale = x.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(x / scale).double() @ q.dequantize(torch.float64).T * scale.double()).float()


@pytest.mark.parametrize("rows", [1, 5, 8, 9, 33])
@pytest.mark.parametrize("bits, group", [(8, 128), (4, 32)])
def test_the_integer_kernel_computes_its_arithmetic_and_tracks_the_weight_only_product(bits, group, rows):
    assert cpu_kernels.loaded(), "run `make install`: it builds rung's kernels"
    generator = torch.Generator().manual_seed(rows)
    weight, x = torch.randn(50, 256, generator=generator), 3 * torch.randn(rows, 256, generator=generator)
    if rows > 2:
        x[1] = 0.0
    q = quantize(weight, bits, group)
    packed = CpuKernelOps().pack_linear(q)  # 50 output rows: a block of 16 only partly used
    assert isinstance(packed, PackedQuantized)
    out = CpuKernelOps().linear(x, packed, None)
    expected = integer_arithmetic(x, q)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    weight_only = TorchOps().linear(x, q, None)  # the PyTorch path: the dequantized weight, x as it is
    assert torch.equal(weight_only, x @ q.dequantize().T)
    assert (out - weight_only).abs().max() <= 0.02 * weight_only.abs().max()  # x's own rounding, half a level
    bias = torch.randn(50, generator=generator)
    half = CpuKernelOps().linear(x.bfloat16(), packed, bias.bfloat16())
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), integer_arithmetic(x.bfloat16().float(), q) + bias, rtol=2e-2,
                               atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("bits, group", [(8, 128), (4, 16), (4, 64)])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_triton_kernel_computes_the_weight_only_product(bits, group, rows, dtype, tolerance):
    """Under Triton's interpreter (conftest sets TRITON_INTERPRET=1): the GPU's kernel, 70 output rows (a partly used
    block), int4 unpacked from bytes in the kernel."""
    from rung.serving.worker.ops.triton_ops import TritonOps, TritonQuantized

    generator = torch.Generator().manual_seed(rows + bits)
    q = quantize(torch.randn(70, 256, generator=generator), bits, group)
    x, bias = torch.randn(rows, 256, generator=generator).to(dtype), torch.randn(70, generator=generator).to(dtype)
    packed = TritonOps().pack_linear(q)
    assert isinstance(packed, TritonQuantized) and packed.levels.shape == (70, 256 * bits // 8)
    out = TritonOps().linear(x, packed, bias)
    expected = TorchOps().linear(x.float(), q, bias.float())  # the product in fp32: bf16's reference rounds more
    assert out.dtype == dtype
    assert (out.float() - expected.float()).abs().max() <= tolerance * expected.float().abs().max()
    assert TritonOps().pack_linear(quantize(torch.randn(8, 24), 4, 12)).__class__.__name__ == "QuantizedWeight"


@pytest.mark.parametrize("name", ["llama-gqa1-tied", "qwen2-bias", "mixtral", "granitemoe-shared"])
def test_the_pytorch_path_serves_exactly_the_dequantized_model(name, tmp_path):
    """Greedy tokens of the engine at int4 equal transformers' with every projection and every MoE expert's
    projections (transformers stacks them, [experts, out, in]) replaced by their levels."""
    reference = saved_reference(name, tmp_path)
    with torch.no_grad():
        for module_name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.endswith(PROJECTIONS):
                module.weight.copy_(quantize(module.weight, 4, 16).dequantize())
            if module_name.endswith(".experts"):
                for stacked in (module.gate_up_proj, module.down_proj):
                    for expert in stacked:
                        expert.copy_(quantize(expert, 4, 16).dequantize())
    prompts = [list(range(1, 30)), [7, 7, 7, 3, 9]]
    expected = [transformers_greedy(reference, prompt, 10) for prompt in prompts]
    for backend in ("torch", "triton"):  # Triton's quantized GEMM under its interpreter
        engine = LLM(tmp_path, num_blocks=64, block_size=4, quantization="int4", quantization_group_size=16,
                     attention_backend=backend)
        outputs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        assert [output[0].token_ids for output in outputs] == expected, backend


def test_a_quantized_model_serves_the_openai_api_with_streaming_n_prefix_caching_and_preemption(model_dir, tmp_path):
    """A KV pool of ~13 blocks of 16 tokens: eight requests of 100 tokens each cannot all hold theirs at once."""
    from transformers import AutoTokenizer

    server = Server(model_dir, tmp_path / "serve.log", "--quantization", "int4", "--group-size", "16",
                    "--kv-cache-memory", "0.0002", "--max-num-seqs", "8")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        card = http("GET", f"{server.url}/v1/models")[2]
        assert json.loads(card)["data"][0]["quantization"] == "int4"
        assert server.metrics()['rung_serve_model_info{dtype="float32",model_name="tiny",quantization="int4"}'] == 1
        # the server's greedy text is the offline engine's at the same quantization
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        prompt = "def main():\n    x = 1\n"
        offline = LLM(model_dir, quantization="int4", quantization_group_size=16).generate(
            [tokenizer(prompt)["input_ids"]], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
        served = client.completions.create(model="tiny", prompt=prompt, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert served.choices[0].text == tokenizer.decode(offline[0][0].token_ids)
        args = dict(model="tiny", messages=[{"role": "user", "content": "write code"}], max_tokens=20,
                    temperature=0.8, seed=3)
        whole = client.chat.completions.create(**args).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(**args, stream=True)
                           if c.choices)
        assert streamed == whole
        two = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, n=2, temperature=1.0, seed=5)
        assert sorted(c.index for c in two.choices) == [0, 1]
        before = server.metrics()['rung_serve_prefix_cache_hits_total{model_name="tiny"}']
        long_prompt = "import os\n" * 12  # several full blocks, asked twice
        for _ in range(2):
            client.completions.create(model="tiny", prompt=long_prompt, max_tokens=4, temperature=0)
        assert server.metrics()['rung_serve_prefix_cache_hits_total{model_name="tiny"}'] > before
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: client.completions.create(
                model="tiny", prompt=f"x{i} = [" * 8, max_tokens=70, temperature=0, extra_body={"ignore_eos": True}),
                range(8)))
        assert all(r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 70 for r in results)
        assert server.metrics()['rung_serve_preemptions_total{model_name="tiny"}'] > 0
    finally:
        server.stop()


def transformers_loss(model_dir, windows: list[torch.Tensor]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total = count = 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += len(window) - 1
    return total / count


def test_eval_reports_the_perplexity_transformers_computes_and_what_quantization_costs(model_dir, tmp_path):
    from transformers import AutoTokenizer

    from rung.serving.model_tools.perplexity import evaluate, read_documents, token_windows

    data = tmp_path / "held-out.jsonl"
    data.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i % 7}\n"}) + "\n"
                            for i in range(40)))
    result = run_rung("eval", str(model_dir), "--data", str(data), "--context", "64", "--json",
                      str(tmp_path / "eval.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "eval " in result.stderr and "tok/s" in result.stderr and "eta" in result.stderr  # progress
    full = json.loads((tmp_path / "eval.json").read_text())
    assert json.loads(result.stdout) == full and full["quantization"] == "none" and full["context"] == 64
    windows = token_windows(AutoTokenizer.from_pretrained(model_dir), read_documents(data), 64, None)
    assert full["tokens"] == sum(len(w) - 1 for w in windows) and full["windows"] == len(windows) > 3
    assert full["loss"] == pytest.approx(transformers_loss(model_dir, windows), rel=1e-4)
    from rung.serving.config import engine_config

    results = {scheme: evaluate(str(model_dir), str(data), engine_config({"quantization": scheme,
                                                                          "quantization_group_size": 16}), 64)
               for scheme in ("int8", "int4")}
    for scheme, result in results.items():
        assert result["tokens"] == full["tokens"] and result["weight_bytes"] < full["weight_bytes"], scheme
        # the levels change the function, a little (rounding may as well lower the perplexity as raise it)
        assert result["loss"] != full["loss"] and abs(result["perplexity"] / full["perplexity"] - 1) < 0.25, scheme
    assert results["int4"]["weight_bytes"] < results["int8"]["weight_bytes"]


def test_bad_quantization_settings_and_eval_data_are_refused(model_dir, tmp_path):
    assert_clean_failure(run_rung("serve", str(model_dir), "--quantization", "int3"), "--quantization",
                         "invalid choice")
    assert_clean_failure(run_rung("eval", str(model_dir), "--data", str(tmp_path / "none.txt"), "--group-size", "0"),
                         "--group-size", "at least 1")
    text = tmp_path / "text.txt"
    text.write_text("def f(x):\n    return x\n" * 20)
    # 24 divides no projection's input of this model (64 and 176 features)
    assert_clean_failure(run_rung("eval", str(model_dir), "--data", str(text), "--quantization", "int4",
                                  "--group-size", "24"), "--group-size: 24 does not divide", "input features")
    assert_clean_failure(run_rung("serve", str(model_dir), "--quantization", "int4", "--group-size", "24"),
                         "--group-size: 24 does not divide")
    assert_clean_failure(run_rung("eval", str(model_dir), "--data", str(tmp_path / "none.txt")), "no such file")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert_clean_failure(run_rung("eval", str(model_dir), "--data", str(tmp_path / "latin1.txt")), "not UTF-8")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    assert_clean_failure(run_rung("eval", str(model_dir), "--data", str(tmp_path / "bad.jsonl")), "line 2")
    assert_clean_failure(run_rung("eval", str(model_dir), "--data", str(text), "--context", "1"), "--context")
    assert_clean_failure(run_rung("serve", str(model_dir), "--engine", "vllm", "--quantization", "int8"),
                         "--quantization", "rung's engine only")
    with pytest.raises(ConfigError, match="quantization"):
        LLM(model_dir, quantization="int3")


def planted(model_dir, folder, layer: int) -> str:
    """`model_dir` with one projection, layer `layer`'s down_proj, made hard to quantize without changing what it
    computes: every 16th FFN unit is switched off (its gate row zeroed, so its activation is exactly 0) and the
    down_proj column reading it made 100x larger. int4's scale, the group's largest over 7, then rounds the rest
    of each group of 16 inputs to zero; int8's, over 127, keeps them."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, folder)
    weights = load_file(str(folder / "model.safetensors"))
    prefix = f"model.layers.{layer}.mlp."
    weights[prefix + "gate_proj.weight"][::16] = 0.0
    weights[prefix + "down_proj.weight"][:, ::16] = 100 * weights[prefix + "down_proj.weight"].abs().max()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return prefix + "down_proj"


def test_the_mixed_allocation_meets_its_budget_and_gives_the_sensitive_layer_more_bits(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rung.serving.model_tools.perplexity import prefill, window_cache
    from rung.serving.model_tools.quantize import average_bits, bits_per_weight
    from rung.serving.worker.compressed_tensors import describe
    from rung.serving.worker.runner import load_model
    from rung.serving.worker.weights import load_weights

    sensitive = planted(model_dir, tmp_path / "float", layer=1)
    text = tmp_path / "calibration.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120)))
    weights = load_weights(tmp_path / "float")
    sizes = {"down": (weights[sensitive + ".weight"].numel(), 176)}  # this model: d 64, FFN 176
    everything = sum(w.numel() for n, w in weights.items() if n.endswith("_proj.weight"))
    # room for the sensitive layer at int8 and nothing else of its size: 4.5 bits at groups of 16 is int4's 6.0 plus
    budget = bits_per_weight(4, 64, 16) + sizes["down"][0] * (bits_per_weight(8, 176, 16) - bits_per_weight(4, 176, 16)
                                                              ) / everything + 0.01
    result = run_rung("quantize", str(tmp_path / "float"), "--out", str(tmp_path / "mixed"), "--bits-budget",
                      f"{budget:.4f}", "--group-size", "16", "--calibration", str(text))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "quantize: sensitivity" in result.stderr and "eta" in result.stderr
    report = json.loads((tmp_path / "mixed" / "rung_quantization.json").read_text())
    assert report["average_bits"] <= budget
    rises = {unit: row["int4_loss_rise"] for unit, row in report["units"].items()}
    assert max(rises, key=rises.get) == sensitive  # measured as the most sensitive
    assert [u for u, row in report["units"].items() if row["bits"] == 8] == [sensitive]
    sizes = {u: (row["weights"], 176 if u.endswith("down_proj") else 64) for u, row in report["units"].items()}
    assert average_bits({u: row["bits"] for u, row in report["units"].items()}, sizes, 16) == report["average_bits"]
    assert describe(tmp_path / "mixed") == "mixed" and describe(tmp_path / "float") == "none"
    # the folder loads back to exactly the levels written, in rung and (through compressed-tensors) in transformers
    levels = load_weights(tmp_path / "mixed")
    for name in (sensitive, "model.layers.0.self_attn.q_proj"):
        written = levels[name + ".weight"]
        expected = quantize(weights[name + ".weight"], 8 if name == sensitive else 4, 16)
        assert written.bits == expected.bits and torch.equal(written.q, expected.q)
        assert torch.equal(written.scales, expected.scales)
    model = load_model(tmp_path / "mixed", engine_config_of(attention_backend="torch"))
    tokens = torch.arange(1, 60)
    ours = model.logits(prefill(model, tokens, window_cache(model, 64)))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours, reference(tokens[None]).logits[0], atol=1e-4, rtol=1e-4)
    # the allocation pays: the mixed folder's loss sits below uniform int4's
    losses = {}
    for name, settings in (("mixed", {}), ("float", {"quantization": "int4", "quantization_group_size": 16})):
        from rung.serving.model_tools.perplexity import evaluate

        losses[name] = evaluate(str(tmp_path / name), str(text), engine_config_of(**settings))["loss"]
    assert losses["mixed"] < losses["float"]


def test_quantize_writes_moe_experts_as_levels_that_serve_as_at_load(tmp_path):
    """A Mixtral folder's experts are units of the allocation (a layer's gates and ups, and its downs); the folder
    holds each expert's w1, w2 and w3 as levels, and rung serves it as it serves the float folder quantized at load:
    the same bytes, the same logits."""
    from rung.serving.model_tools.perplexity import prefill, window_cache
    from rung.serving.model_tools.quantize import quantize_folder
    from rung.serving.worker.runner import load_model
    from rung.serving.worker.weights import load_weights

    saved_reference("mixtral", tmp_path / "float")  # d 48, 4 experts of FFN 64, 2 layers: int4 at groups of 16 is 6.0
    weights = load_weights(tmp_path / "float")
    ids = torch.randint(0, 211, (400,), generator=torch.Generator().manual_seed(0))  # calibration token ids
    experts = "model.layers.1.block_sparse_moe.experts."
    for budget, out in ((7.0, "mixed"), (6.0, "int4")):
        report = quantize_folder(str(tmp_path / "float"), str(tmp_path / out), budget, ids, 16, 400)
        assert report["units"][experts + "gate_up_proj"]["weights"] == 4 * 2 * 64 * 48
        assert report["units"][experts + "down_proj"]["weights"] == 4 * 48 * 64
        assert all(row["int4_loss_rise"] != 0 for row in report["units"].values())  # each measured in the model
        assert report["average_bits"] <= budget
        levels = load_weights(tmp_path / out)
        for e in range(4):
            for kind in ("w1", "w2", "w3"):
                name = f"{experts}{e}.{kind}.weight"
                bits = report["units"][experts + ("down_proj" if kind == "w2" else "gate_up_proj")]["bits"]
                expected = quantize(weights[name], bits, 16)
                assert torch.equal(levels[name].q, expected.q) and torch.equal(levels[name].scales, expected.scales)
    assert {row["bits"] for row in report["units"].values()} == {4}
    folder = load_model(tmp_path / "int4", engine_config_of(attention_backend="torch"))
    at_load = load_model(tmp_path / "float", engine_config_of(attention_backend="torch", quantization="int4",
                                                              quantization_group_size=16))
    assert folder.weight_bytes == at_load.weight_bytes
    tokens = torch.arange(1, 40)
    logits = [model.logits(prefill(model, tokens, window_cache(model, 64))) for model in (folder, at_load)]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-4, rtol=1e-4)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)  # the CPU's integer kernel path too
    served = [LLM(tmp_path / "int4", num_blocks=32, block_size=4).generate([list(range(1, 20))], greedy),
              LLM(tmp_path / "float", num_blocks=32, block_size=4, quantization="int4",
                  quantization_group_size=16).generate([list(range(1, 20))], greedy)]
    assert served[0][0][0].token_ids == served[1][0][0].token_ids
    # a third-party folder with one expert's projection float and the rest levels is refused, naming the layer
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "int4", tmp_path / "partial")
    tensors = load_file(str(tmp_path / "partial" / "model.safetensors"))
    for suffix in ("weight_packed", "weight_scale", "weight_shape"):
        del tensors[f"{experts}0.w1.{suffix}"]
    tensors[f"{experts}0.w1.weight"] = weights[f"{experts}0.w1.weight"]
    save_file(tensors, str(tmp_path / "partial" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RungError, match="layer 1's experts are partly quantized"):
        load_model(tmp_path / "partial", engine_config_of(attention_backend="torch"))


def engine_config_of(**settings):
    from rung.serving.config import engine_config

    return engine_config(settings)


def test_quantize_calibrates_on_the_exporting_runs_validation_split_and_refuses_bad_input(model_dir, tmp_path):
    result = run_rung("quantize", str(model_dir), "--out", str(tmp_path / "q"), "--bits-budget", "6",
                      "--group-size", "16", "--calibration-tokens", "2048")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "q" / "rung_quantization.json").read_text())
    assert report["calibration"] == "the exporting run's validation split" and report["calibration_tokens"] > 1000
    assert LLM(tmp_path / "q").generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0][0].token_ids
    out = tmp_path / "out"
    for args, needles in [
        (("--bits-budget", "3", "--group-size", "16"), ("--bits-budget 3 is outside", "6.000", "8.")),
        (("--bits-budget", "6", "--group-size", "6"), ("--group-size", "must be a positive multiple of 4")),
        (("--bits-budget", "6", "--group-size", "32"), ("--group-size 32 does not divide", "176")),
        (("--bits-budget", "6", "--group-size", "16", "--calibration", str(tmp_path / "none.txt")), ("no such file",)),
        (("--bits-budget", "6", "--group-size", "16", "--calibration-tokens", "1"), ("--calibration-tokens",)),
    ]:
        assert_clean_failure(run_rung("quantize", str(model_dir), "--out", str(out), *args), *needles)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))  # nothing half-written
    assert_clean_failure(run_rung("quantize", str(tmp_path / "q"), "--out", str(out), "--bits-budget", "6"),
                         "already quantized")
    assert_clean_failure(run_rung("quantize", str(model_dir), "--out", str(tmp_path / "q"), "--bits-budget", "6",
                                  "--group-size", "16"), "exists and is not empty")
    assert (tmp_path / "q" / "rung_quantization.json").is_file()  # the folder already there is untouched
    assert_clean_failure(run_rung("serve", str(tmp_path / "q"), "--quantization", "int8"), "already quantized")
