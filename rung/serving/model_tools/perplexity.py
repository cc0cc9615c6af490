"""`rung eval`: a model folder's perplexity on held-out text, computed by rung's inference model with the weights,
compute path and quantization `rung serve` would use — so what a quantization costs is measured where it serves.

The text's documents are tokenized with the folder's tokenizer, joined by its end-of-sequence token and cut into
windows of `context` tokens; each window is one prefill over a KV pool of its own, and every token after a window's
first is scored against the model's prediction from the tokens before it in that window.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from rung.errors import RungError
from rung.platform.progress import Progress
from rung.serving.config import EngineConfig
from rung.serving.worker.model import InferenceModel
from rung.serving.worker.runner import SLOT_PADDING, load_model
from rung.serving.worker.step import StepInputs

LOGIT_ROWS = 256  # rows of logits at a time: a long window's [tokens, vocabulary] never exists at once


def read_documents(path: str | Path) -> list[str]:
    """A text file is one document; a .jsonl file holds one {"text": ...} object per line."""
    path = Path(path)
    if not path.is_file():
        raise RungError(f"--data: no such file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise RungError(f"--data: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if path.suffix != ".jsonl":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            document = None
        if not isinstance(document, str):
            raise RungError(f"--data: line {number} of {path} is not a JSON object with a \"text\" string")
        documents.append(document)
    return documents


def token_windows(tokenizer, documents: list[str], context: int, max_tokens: int | None) -> list[torch.Tensor]:
    """The documents' tokens, each followed by the end-of-sequence token, in windows of `context` (the last may be
    shorter; one of a single token scores nothing and is dropped)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = [token for text in documents for token in [*tokenizer(text, add_special_tokens=False)["input_ids"], *eos]]
    ids = ids[:max_tokens] if max_tokens else ids
    windows = [torch.tensor(ids[start:start + context]) for start in range(0, len(ids), context)]
    return [window for window in windows if len(window) > 1]


def window_cache(model: InferenceModel, window: int) -> torch.Tensor:
    """A KV pool for one window of `window` tokens."""
    spec = model.spec
    return torch.zeros(spec.num_layers, 2, spec.num_kv_heads, (window + SLOT_PADDING) * spec.head_dim,
                       dtype=model.dtype, device=model.device)


@torch.inference_mode()
def prefill(model: InferenceModel, tokens: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """The final hidden states [tokens, d] of one request's prefill of `tokens` into `cache`."""
    count = len(tokens)
    step = StepInputs(token_ids=tokens, positions=torch.arange(count), slots=torch.arange(count),
                      spans=[(0, count, [slice(0, count)])]).to(model.device)
    model.ops.prepare(step)
    return model.forward(step, cache)


@torch.inference_mode()
def window_loss(model: InferenceModel, tokens: torch.Tensor, cache: torch.Tensor) -> float:
    """The summed negative log-likelihood of tokens[1:] given the tokens before each, in one prefill."""
    hidden, targets = prefill(model, tokens, cache)[:-1], tokens[1:].to(model.device)
    return sum(F.cross_entropy(model.logits(hidden[start:start + LOGIT_ROWS]), targets[start:start + LOGIT_ROWS],
                               reduction="sum").item()
               for start in range(0, len(targets), LOGIT_ROWS))


def evaluate(model_dir: str, data: str, config: EngineConfig, context: int | None = None,
             max_tokens: int | None = None) -> dict:
    """Perplexity and mean loss per token over the data's windows, with progress on stderr."""
    from rung.serving.api.state import load_tokenizer

    for flag, value in (("--context", context), ("--max-tokens", max_tokens)):
        if value is not None and value < 2:
            raise RungError(f"{flag} must be at least 2, got {value}")
    documents = read_documents(data)
    model = load_model(model_dir, config)
    spec = model.spec
    window = min(context or spec.max_position_embeddings, spec.max_position_embeddings)
    windows = token_windows(load_tokenizer(model_dir), documents, window, max_tokens)
    if not windows:
        raise RungError(f"--data: {data} holds fewer than 2 tokens")
    cache = window_cache(model, window)
    progress, total, scored = Progress("eval", len(windows), "tok"), 0.0, 0
    for index, tokens in enumerate(windows, 1):
        total += window_loss(model, tokens, cache)
        scored += len(tokens) - 1
        if index % 10 == 0 or index == len(windows):
            print(progress.line(index, scored), file=sys.stderr, flush=True)
    loss = total / scored
    return {"model": str(model_dir), "data": str(data), "tokens": scored, "windows": len(windows), "context": window,
            "dtype": config.dtype, "quantization": config.quantization,
            "group_size": config.quantization_group_size if config.quantization == "int4" else None,
            "weight_bytes": model.weight_bytes, "loss": loss,
            "perplexity": float(torch.tensor(loss).exp())}
