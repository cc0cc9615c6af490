"""Export: rung checkpoints load in transformers as Llama/Mixtral/Granite models and compute the same function."""

from __future__ import annotations

import json
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rung.jobs.config import DataConfig, RunConfig
from rung.jobs.export.hf_folder import export, find_checkpoint
from rung.jobs.model.build import build_model
from rung.jobs.model.transformer import greedy_decode
from tests.conftest import assert_clean_failure, run_rung

# Non-base shapes: width 64 over base 32 (m = 2), depth 2 over base 1 (m_L = 2), an embedding multiplier, and
# untied readout — every multiplier differs from one.
SHAPE = ("model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2", "param.base_width=32",
         "param.base_depth=1", "param.embedding_mult=2.5", "param.output_mult=1.5", "train.steps=3",
         "train.warmup_steps=1", "train.lr=0.01")
FAMILIES = {
    "dense": (),
    "moe": ("model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.capacity_factor=null"),
    "moe-shared": ("model.moe.n_experts=4", "model.moe.top_k=1", "model.moe.capacity_factor=null",
                   "model.moe.shared_expert=true", "model.tie_embeddings=true"),
}


def train_run(root: Path, data_cache: Path, name: str, *overrides: str, workers: int = 1) -> Path:
    sets = [f"out_dir={root}", f"name={name}", f"data.cache_dir={data_cache}", *overrides]
    result = run_rung("train", "tiny", "--workers", str(workers), *[a for s in sets for a in ("--set", s)])
    assert result.returncode == 0, result.stderr[-3000:]
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_cache) -> dict:
    root = tmp_path_factory.mktemp("runs")
    keys = [(family, param) for family in FAMILIES for param in ("sp", "mup", "completep")]
    with ThreadPoolExecutor(2) as pool:  # two one-thread training processes at a time, one per core
        folders = pool.map(lambda key: train_run(root, data_cache, "-".join(key), *SHAPE, *FAMILIES[key[0]],
                                                 f"param.name={key[1]}"), keys)
        return dict(zip(keys, folders))


def rung_model(run_dir: Path):
    ck = find_checkpoint(run_dir)
    model, _ = build_model(RunConfig(model=ck.model, param=ck.param, data=DataConfig(vocab_size=ck.model.vocab_size)))
    missing, unexpected = model.load_state_dict(load_file(str(ck.path / "model.safetensors")), strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)  # tied models have no lm_head
    return model.eval()


def load_hf(folder: Path):
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


CASES = [(f, p, fmt) for f in FAMILIES for p in ("sp", "mup", "completep") for fmt in ("llama", "granite")
         if not (f == "moe-shared" and fmt == "llama")]


@pytest.mark.parametrize("family, param, fmt", CASES)
def test_exported_model_computes_the_same_function(runs, tmp_path, family, param, fmt):
    folder = export(runs[(family, param)], tmp_path / "hf", fmt=fmt)
    hf, ours = load_hf(folder), rung_model(runs[(family, param)])
    expected = {("dense", "llama"): "LlamaForCausalLM", ("moe", "llama"): "MixtralForCausalLM",
                ("dense", "granite"): "GraniteForCausalLM", ("moe", "granite"): "GraniteMoeForCausalLM",
                ("moe-shared", "granite"): "GraniteMoeSharedForCausalLM"}[(family, fmt)]
    assert type(hf).__name__ == expected
    tokens = torch.randint(0, 2048, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens).logits).abs().max().item() <= 1e-4
    prompt = tokens[:1, :12]
    generated = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                            do_sample=False)[:, 12:]
    assert torch.equal(generated, greedy_decode(ours, prompt, 32))


@pytest.mark.parametrize("family, fmt, cut, kept", [("dense", "llama", "1", [0]), ("moe", "granite", "every-2", [1])])
def test_a_depth_cut_exports_the_sub_network_with_the_parents_multipliers(runs, tmp_path, family, fmt, cut, kept):
    """CompleteP runs of 2 layers (residual multiplier (1/2)^α of the parent's depth): the first layer alone, or the
    last of every 2; transformers loads the cut with no missing or unexpected keys, its logits are rung's own
    forward through those layers only, and rung's engine generates transformers' greedy tokens from it."""
    from rung.serving.core.params import SamplingParams
    from rung.serving.engine.llm import LLM

    run = runs[(family, "completep")]
    result = run_rung("export", str(run), "--out", str(tmp_path / "cut"), "--format", fmt, "--layers", cut)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "not trained for depth cuts" in result.stderr
    hf, ours = load_hf(tmp_path / "cut"), rung_model(run)
    assert hf.config.num_hidden_layers == len(kept)
    tokens = torch.randint(0, 2048, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens, layers=kept).logits).abs().max().item() <= 1e-4
        assert (hf(tokens).logits - ours(tokens).logits).abs().max().item() > 1e-2  # not the whole network
    provenance = json.loads((tmp_path / "cut" / "rung_export.json").read_text())
    assert provenance["cut"] == {"layers": kept, "of": 2, "width_fraction": 1.0}
    assert f"layers {kept[0]} of its 2" in (tmp_path / "cut" / "README.md").read_text()
    prompt = tokens[0, :12]
    with torch.no_grad():
        expected = hf.generate(prompt[None], attention_mask=torch.ones(1, 12, dtype=torch.long), max_new_tokens=8,
                               min_new_tokens=8, do_sample=False)[0, 12:].tolist()
    served = LLM(tmp_path / "cut", num_blocks=16, block_size=4).generate(
        [prompt.tolist()], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert served[0][0].token_ids == expected


@pytest.mark.parametrize("family, param, layers", [("dense", "mup", None), ("moe", "completep", [0])])
def test_a_width_cut_computes_the_parent_with_the_other_heads_and_units_silenced(runs, tmp_path, family, param,
                                                                                 layers):
    """Half the heads (4 → 2, key/value 2 → 1) and FFN units (176 → 88) of every layer and expert: the exported cut
    computes what the parent does with the other heads' output columns and the other units' down-projection columns
    zeroed (they then add nothing), through the layers kept."""
    args = ("--width-fraction", "0.5") + (() if layers is None else ("--layers", str(len(layers))))
    result = run_rung("export", str(runs[(family, param)]), "--out", str(tmp_path / "cut"), *args)
    assert result.returncode == 0, result.stderr[-2000:]
    hf, ours = load_hf(tmp_path / "cut"), rung_model(runs[(family, param)])
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads, hf.config.intermediate_size) == (2, 1, 88)
    with torch.no_grad():
        for name, tensor in ours.state_dict().items():
            if name.endswith("o_proj.weight"):
                tensor[:, 2 * 16:] = 0  # head dim 16
            elif name.endswith("down_proj.weight"):
                tensor[:, 88:] = 0
        tokens = torch.randint(0, 2048, (3, 48), generator=torch.Generator().manual_seed(1))
        assert (hf(tokens).logits - ours(tokens, layers=layers).logits).abs().max().item() <= 1e-4
    assert json.loads((tmp_path / "cut" / "rung_export.json").read_text())["cut"]["width_fraction"] == 0.5


def test_a_depth_cut_of_a_layerdrop_run_is_exported_without_a_warning(tmp_path, data_cache):
    run = train_run(tmp_path, data_cache, "layerdrop", *SHAPE, "param.name=completep", "train.layerdrop=0.5")
    result = run_rung("export", str(run), "--out", str(tmp_path / "cut"), "--layers", "every-2")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr[-2000:]
    assert "trained with LayerDrop p = 0.5" in (tmp_path / "cut" / "README.md").read_text()
    with torch.no_grad():
        tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))
        difference = load_hf(tmp_path / "cut")(tokens).logits - rung_model(run)(tokens, layers=[1]).logits
    assert difference.abs().max().item() <= 1e-4
    width = run_rung("export", str(run), "--out", str(tmp_path / "narrow"), "--width-fraction", "0.5")
    assert width.returncode == 0 and "not trained for width cuts" in width.stderr, width.stderr[-2000:]


def test_bad_cuts_are_refused(runs, tmp_path):
    source = str(runs[("dense", "sp")])
    for args, needles in ((("--layers", "3"), ("--layers 3", "has 2 layers")), (("--layers", "0"), ("keep 1 to 2",)),
                          (("--layers", "every-3"), ("every-3", "2 to the model's depth 2")),
                          (("--layers", "half"), ("not K", "every-N")),
                          (("--width-fraction", "0.3"), ("0.3 of 4 attention heads is 1.2", "whole number")),
                          (("--width-fraction", "0.25"), ("0.25 of 2 key/value heads is 0.5",)),
                          (("--width-fraction", "1.5"), ("--width-fraction must be in (0, 1]",))):
        assert_clean_failure(run_rung("export", source, "--out", str(tmp_path / "a"), *args), *needles)
    # Granite derives head_dim from d_model / heads, which a width cut changes; Mixtral has no shared expert
    assert_clean_failure(run_rung("export", str(runs[("moe-shared", "sp")]), "--out", str(tmp_path / "a"),
                                  "--format", "granite", "--width-fraction", "0.5"), "head_dim", "use --format llama")
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".*tmp*"))


def test_bfloat16_export(runs, tmp_path):
    folder = export(runs[("moe", "completep")], tmp_path / "hf", dtype="bfloat16")
    hf, ours = load_hf(folder), rung_model(runs[("moe", "completep")])
    assert hf.dtype == torch.bfloat16
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        difference = (hf(tokens).logits.float() - ours(tokens).logits).abs().max().item()
    assert difference <= 0.1  # bf16 tolerance: weights rounded to 8 mantissa bits, logits of order 1-10


def test_tokenizer_round_trips_and_has_a_chat_template(runs, tmp_path):
    folder = export(runs[("dense", "mup")], tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "def greet(name):\n    return f'héllo {name} ✓'\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    chat = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    card = (folder / "README.md").read_text()
    assert "parametrization: `mup`" in card and "training tokens" in card


def test_sharded_weights_load_and_nothing_is_unpickled(runs, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    folder = export(runs[("moe", "mup")], tmp_path / "hf", max_shard_bytes=200_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not [p for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    hf, ours = load_hf(folder), rung_model(runs[("moe", "mup")])
    tokens = torch.randint(0, 2048, (2, 16))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens).logits).abs().max().item() <= 1e-4


def test_zero2_two_workers_and_zero3_checkpoints_export_the_same_weights(tmp_path, data_cache):
    # A tiny LR keeps every run's weights within 1e-7 of the (name-seeded, identical) init: the comparison then
    # tests how shards are consolidated, not how Adam amplifies rounding differences between ZeRO stages.
    common = (*SHAPE, "train.steps=4", "train.lr=1e-8")
    with ThreadPoolExecutor(2) as pool:  # the one-worker runs (one thread each) side by side
        single, zero3 = pool.map(lambda job: train_run(tmp_path, data_cache, *job),
                                 [("single", *common), ("zero3", *common, "train.zero_stage=3")])
    runs = {"single": single, "zero3": zero3,
            "zero2x2": train_run(tmp_path, data_cache, "zero2x2", *common, "train.zero_stage=2", workers=2)}
    weights = {name: load_file(str(export(run, tmp_path / f"hf-{name}") / "model.safetensors"))
               for name, run in runs.items()}
    for name in ("zero2x2", "zero3"):
        assert weights[name].keys() == weights["single"].keys()
        for key, tensor in weights["single"].items():
            assert torch.allclose(weights[name][key], tensor, atol=1e-6, rtol=0), (name, key)


def test_bad_sources_and_outputs(runs, tmp_path):
    source = runs[("dense", "sp")]
    assert_clean_failure(run_rung("export", str(tmp_path), "--out", str(tmp_path / "a")), "neither a rung checkpoint")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    assert_clean_failure(run_rung("export", str(source), "--out", str(occupied)), "--overwrite")
    assert (occupied / "keep.txt").read_text() == "mine"
    shared = runs[("moe-shared", "sp")]
    assert_clean_failure(run_rung("export", str(shared), "--out", str(tmp_path / "b")), "shared expert", "granite")
    checkpoint = find_checkpoint(source).path
    damaged = tmp_path / "damaged" / "checkpoints" / checkpoint.name
    damaged.parent.mkdir(parents=True)
    shutil.copytree(checkpoint, damaged)
    (damaged / "optimizer.safetensors").unlink()
    assert_clean_failure(run_rung("export", str(damaged), "--out", str(tmp_path / "c")), "missing file")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # no half-written folder anywhere


def test_capacity_dropping_is_refused_unless_allowed(tmp_path, data_cache):
    run = train_run(tmp_path, data_cache, "capacity", "train.steps=2", "train.warmup_steps=1",
                    "model.moe.n_experts=4", "model.moe.capacity_factor=1.25")
    assert_clean_failure(run_rung("export", str(run), "--out", str(tmp_path / "hf")), "capacity_factor")
    result = run_rung("export", str(run), "--out", str(tmp_path / "hf"), "--allow-dropless")
    assert result.returncode == 0, result.stderr
    load_hf(tmp_path / "hf")


def test_vllm_loads_the_export_and_matches_transformers(runs, tmp_path):
    vllm = pytest.importorskip("vllm", reason="vLLM is not installed here (it needs a GPU machine: pip install vllm)")
    folder = export(runs[("moe", "mup")], tmp_path / "hf")
    prompt = torch.randint(0, 2048, (1, 12), generator=torch.Generator().manual_seed(3))
    expected = load_hf(folder).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32,
                                        min_new_tokens=32, do_sample=False)[0, 12:]
    engine = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32, ignore_eos=True)
    output = engine.generate([{"prompt_token_ids": prompt[0].tolist()}], params)[0].outputs[0].token_ids
    assert list(output) == expected.tolist()
