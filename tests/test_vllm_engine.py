"""`rung serve --engine vllm`: vLLM's engine behind rung's API, metrics and auth.

The served half needs a Python with vLLM: RUNG_VLLM_PYTHON, else the benchmark venv `make bench-vllm-venv` builds
(vLLM's CPU build), else this interpreter on a machine where vLLM is installed (`pip install 'rung[vllm]'` on a
GPU box). Without one it is skipped with that reason; the refusal without vLLM is tested everywhere else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import openai
import pytest
from conftest import REPO, Server, assert_clean_failure, run_rung

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _vllm_python() -> str | None:
    for python in (os.environ.get("RUNG_VLLM_PYTHON"), str(REPO / ".venv-vllm" / "bin" / "python")):
        if python and os.path.exists(python) and subprocess.run(
                [python, "-c", "import vllm"], capture_output=True).returncode == 0:
            return python
    return sys.executable if HAS_VLLM else None


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the refusal cannot happen")
def test_the_vllm_engine_without_vllm_is_refused_with_how_to_get_it(model_dir):
    assert_clean_failure(run_rung("serve", str(model_dir), "--engine", "vllm"), "vllm cannot be imported",
                         "rung[vllm]")


def test_rung_only_settings_are_refused_with_the_vllm_engine(model_dir):
    result = run_rung("serve", str(model_dir), "--engine", "vllm", "--nano-batches", "2")
    assert_clean_failure(result, "--nano-batches", "rung's engine only")


@pytest.fixture(scope="module")
def llama_dir(model_dir, tmp_path_factory):
    """A Llama folder with head_dim 32 (vLLM's CPU attention has no kernel for the tiny export's 16) and the
    export's tokenizer; weights scaled up so greedy choices are not near-ties that rounding could flip."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, folder / name)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=512))
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0) if param.dim() > 1 else None
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vllm_server(llama_dir, tmp_path_factory):
    python = _vllm_python()
    if python is None:
        pytest.skip("no Python with vLLM here (make bench-vllm-venv builds vLLM's CPU build; on a GPU machine "
                    "pip install 'rung[vllm]')")
    env = {"PYTHONPATH": str(REPO), "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}
    server = Server(llama_dir, tmp_path_factory.mktemp("log") / "vllm.log", "--engine", "vllm", "--api-key", "k",
                    python=python, env=env, timeout=300)
    yield server
    server.stop()


def test_vllm_engine_serves_rung_api_with_rung_metrics(vllm_server, llama_dir):
    from transformers import AutoTokenizer

    from rung.serving.core.params import SamplingParams
    from rung.serving.engine.llm import LLM

    client = openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="k", max_retries=0)
    prompts = ["import os\n", "class Foo:\n    def"]
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    rung = LLM(llama_dir).generate([tokenizer(p)["input_ids"] for p in prompts],
                                   SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    served = client.completions.create(model="tiny", prompt=prompts, max_tokens=12, temperature=0, logprobs=2,
                                       extra_body={"ignore_eos": True})
    choices = sorted(served.choices, key=lambda c: c.index)
    assert [c.text for c in choices] == [tokenizer.decode(c[0].token_ids) for c in rung]  # same greedy tokens
    assert all(len(top) == 2 for c in choices for top in c.logprobs.top_logprobs)
    assert served.usage.completion_tokens == 24

    args = dict(model="tiny", messages=[{"role": "user", "content": "write code"}], max_tokens=16,
                temperature=0.8, seed=5)
    response = client.chat.completions.create(**args)
    whole = response.choices[0].message.content
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens > 0
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole

    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{vllm_server.url}/v1", api_key="wrong", max_retries=0).models.list()

    metrics = vllm_server.metrics()
    assert metrics['rung_serve_request_success_total{finish_reason="length",model_name="tiny"}'] == 4
    assert metrics['rung_serve_generation_tokens_total{model_name="tiny"}'] == (
        24 + response.usage.completion_tokens + chunks[-1].usage.completion_tokens)
    assert metrics['rung_serve_time_to_first_token_seconds_count{model_name="tiny"}'] == 4
