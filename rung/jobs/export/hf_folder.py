"""Export a rung checkpoint as a standard Hugging Face model folder — the only interface between training and
serving, so it must be exact. The weights' names and folded multipliers per format: `folding.py`.

Mixtral has no shared expert and Qwen2-MoE's is sigmoid-gated, so a rung MoE with its (ungated) shared expert is
exactly a GraniteMoeShared model: `--format granite`. Export refuses anything else it cannot represent exactly
(capacity-factor token dropping, a head dim Granite cannot express) instead of writing a subtly different model.
The folder is assembled in a temporary directory next to `--out` and renamed into place when complete.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from rung.config import from_dict, to_dict
from rung.errors import RungError
from rung.jobs.config import ModelConfig, ParamConfig
from rung.jobs.data.shards import TOKENIZER_FILE
from rung.jobs.data.tokenizer import EOS
from rung.jobs.export.folding import check_exportable, granite_weights, hf_config, llama_weights
from rung.jobs.model.cuts import cut_weights, cut_width, kept_layers, width_cut
from rung.jobs.params.parametrization import Multipliers, Parametrization
from rung.jobs.run_dir import STATE, WEIGHTS, RunDir
from rung.platform.checkpoint import MANIFEST, CheckpointStore, verify
from rung.platform.folders import refuse_unless_empty, staged_folder
from rung.platform.tensor_files import load_tensors, write_sharded

PROVENANCE = "rung_export.json"  # where the folder came from: its run directory (whose validation split calibrates)

# ChatML turns. With `tools`, a system turn lists them (one JSON object per line) and shows the Hermes call format
# that rung's server reads back (`serving/api/tool_calls.py`); an assistant's calls are written in that format and a
# tool's answer comes back in a user turn between <tool_response> tags.
CHAT_TEMPLATE = (
    "{%- if tools and messages[0]['role'] == 'system' -%}"
    "{%- set system_prompt = messages[0]['content'] -%}{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{{ '<|im_start|>system\\n' }}{% if system_prompt is defined %}{{ system_prompt + '\\n\\n' }}{% endif %}"
    "{{ 'Functions you may call, one JSON signature per line:\\n<tools>\\n' }}"
    "{% for tool in tools %}{{ tool | tojson + '\\n' }}{% endfor %}"
    "{{ '</tools>\\nTo call one, reply with its name and arguments as JSON between tags, one call per line:\\n'"
    " + '<tool_call>\\n{\"name\": <function name>, \"arguments\": <arguments object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- endif -%}"
    "{% for message in messages %}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{% elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{ '<|im_start|>assistant\\n' }}{% if message['content'] %}{{ message['content'] + '\\n' }}{% endif %}"
    "{% for call in message['tool_calls'] %}{{ '<tool_call>\\n{\"name\": ' + call['function']['name'] | tojson"
    " + ', \"arguments\": ' + (call['function']['arguments'] | tojson if call['function']['arguments'] is mapping"
    " else call['function']['arguments']) + '}\\n</tool_call>' }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    run_dir: Path
    state: dict
    model: ModelConfig
    param: ParamConfig
    layerdrop: float  # the run's train.layerdrop (its config.yaml; 0 where the run directory has none)


def find_checkpoint(path: str | Path) -> Checkpoint:
    """A checkpoint directory, or a run directory's newest verified checkpoint; damaged ones are refused."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        problem = verify(path)
        if problem:
            raise RungError(f"{path} is an incomplete or damaged checkpoint: {problem}")
        checkpoint, run_dir = path, path.parent.parent
    elif RunDir(path).checkpoints.is_dir():
        found = CheckpointStore(RunDir(path).checkpoints).latest()
        if found is None:
            raise RungError(f"{path} has no complete, verified checkpoint")
        checkpoint, run_dir = found[1], path
    else:
        raise RungError(f"{path} is neither a rung checkpoint (no {MANIFEST}) nor a run directory (no checkpoints/)")
    state = json.loads((checkpoint / STATE).read_text())
    config = RunDir(run_dir).config
    train = (yaml.safe_load(config.read_text()) or {}).get("train") or {} if config.is_file() else {}
    return Checkpoint(path=checkpoint, run_dir=run_dir, state=state, model=from_dict(ModelConfig, state["model"]),
                      param=from_dict(ParamConfig, state["param"]), layerdrop=float(train.get("layerdrop") or 0))


def _write_tokenizer(run_dir: Path, out: Path, max_len: int) -> int:
    from tokenizers import Tokenizer

    source = RunDir(run_dir).tokenizer
    if not source.is_file():
        raise RungError(f"the run directory {run_dir} has no {TOKENIZER_FILE}")
    tokenizer = Tokenizer.from_file(str(source))
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        raise RungError(f"{source} has no {EOS} token")
    shutil.copyfile(source, out / TOKENIZER_FILE)
    chat = tokenizer.token_to_id("<|im_end|>") is not None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len, "bos_token": EOS,
              "eos_token": "<|im_end|>" if chat else EOS, "pad_token": EOS, "unk_token": None,
              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    if chat:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token", "eos_token", "pad_token")}, indent=2))
    stops = [tokenizer.token_to_id("<|im_end|>"), eos_id] if chat else [eos_id]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos_id, "eos_token_id": stops, "pad_token_id": eos_id}, indent=2))
    return eos_id


def _model_card(ck: Checkpoint, fmt: str, architecture: str, mult: Multipliers, cut: dict | None) -> str:
    transfer = RunDir(ck.run_dir).transfer
    width, depth = ck.param.base_shape(ck.model)
    provenance = transfer.read_text() if transfer.is_file() else "none (hyperparameters set directly)"
    cut = "" if cut is None else (f"- a cut of the parent: layers {', '.join(map(str, cut['layers']))} of its "
                                  f"{cut['of']} (renumbered from 0), {cut['width_fraction']:g} of its heads and "
                                  "feed-forward units, with its multipliers"
                                  + (f"; the parent trained with LayerDrop p = {ck.layerdrop:g}" if ck.layerdrop
                                     else "") + "\n")
    return (f"# {ck.run_dir.name}\n\nTrained with rung; exported as `{architecture}` (`--format {fmt}`).\n\n"
            f"- checkpoint: `{ck.path}` (step {ck.state['step']}, {ck.state['tokens']:,} training tokens)\n{cut}"
            f"- parametrization: `{ck.param.name}`, base shape width {width}, depth {depth}\n"
            f"- forward multipliers: embedding {mult.embedding:g}, attention {mult.attention:g}, "
            f"residual {mult.residual:g}, output {mult.output:g}, router {mult.router:g}"
            f" ({'folded into the weights' if fmt == 'llama' else 'native Granite config fields'})\n\n"
            f"## Hyperparameter transfer\n\n```\n{provenance}\n```\n\n## rung model config\n\n"
            f"```json\n{json.dumps({'model': to_dict(ck.model), 'param': to_dict(ck.param)}, indent=2)}\n```\n")


def export(source: str | Path, out: str | Path, fmt: str = "llama", dtype: str = "float32",
           overwrite: bool = False, allow_dropless: bool = False, max_shard_bytes: int = 5 << 30,
           layers: str | None = None, width_fraction: float | None = None) -> Path:
    """Write the Hugging Face folder for `source` (a checkpoint or run directory) at `out`; returns `out`.
    `layers`, `width_fraction`: a cut (`model/cuts.py`), the sub-network of those layers, heads and units only."""
    out = Path(out)
    if max_shard_bytes < 1:
        raise RungError(f"--max-shard-size must be at least 1 byte, got {max_shard_bytes}")
    refuse_unless_empty(out, overwrite)
    ck = find_checkpoint(source)
    mult = Parametrization(ck.param, ck.model).multipliers  # the parent's, for a cut too (cuts.py says why)
    kept = None if layers is None else kept_layers(layers, ck.model.n_layers)
    model = ck.model if kept is None else replace(ck.model, n_layers=len(kept))
    model = model if width_fraction is None else width_cut(model, width_fraction)
    check_exportable(model, fmt, allow_dropless)
    cuts = (("depth", model.n_layers < ck.model.n_layers, ck.layerdrop > 0),
            ("width", model.n_heads < ck.model.n_heads, False))  # (kind, cut, trained for)
    untrained = [kind for kind, narrower, trained_for in cuts if narrower and not trained_for]
    if untrained:
        print(f"export: warning: {ck.run_dir.name} was not trained for {' or '.join(untrained)} cuts (depth: "
              "train.layerdrop; nested widths are not built yet); the cut's quality is not trained for",
              file=sys.stderr)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a regular file on the way, no permission
        raise RungError(f"--out {out}: cannot create {out.parent} ({err.strerror or err})") from None
    weights = load_tensors(ck.path / WEIGHTS)
    if kept is not None:
        weights = cut_weights(weights, kept)
    if width_fraction is not None:
        weights = cut_width(weights, ck.model, model)
    if fmt == "llama":
        tensors, tied = llama_weights(weights, model, mult)
    else:
        tensors, tied = granite_weights(weights, model, mult), model.tie_embeddings
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    tensors = {name: t.to(torch_dtype) for name, t in tensors.items()}
    with staged_folder(out) as staging:
        eos_id = _write_tokenizer(ck.run_dir, staging, ck.model.max_seq_len)
        config = hf_config(model, mult, fmt, tied, eos_id, dtype)
        config.save_pretrained(staging)
        write_sharded(tensors, staging, max_shard_bytes)
        cut = None if model == ck.model else {"layers": kept or list(range(ck.model.n_layers)),
                                              "of": ck.model.n_layers, "width_fraction": width_fraction or 1.0}
        (staging / "README.md").write_text(_model_card(ck, fmt, config.architectures[0], mult, cut))
        provenance = {"run_dir": str(ck.run_dir.resolve()), "checkpoint": str(ck.path.resolve()),
                      "step": ck.state["step"]}
        if cut is not None:
            provenance["cut"] = cut
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2))
    return out
