"""The offline engine: `LLM(model_dir).generate(prompts, SamplingParams(...))` runs scheduler → runner →
scheduler until every request finishes. Async overlap and nano-batching are the engine issue's remaining work."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rung.errors import RungError
from rung.serving.kv_cache import KVCacheManager
from rung.serving.model import InferenceModel, load_weights
from rung.serving.model_spec import load_spec
from rung.serving.params import SamplingParams
from rung.serving.request import Request
from rung.serving.runner import ModelRunner
from rung.serving.scheduler import Scheduler


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token under the model
    finish_reason: str  # "stop" or "length"


class LLM:
    def __init__(self, model_dir: str | Path, num_blocks: int = 512, block_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, dtype: torch.dtype = torch.float32):
        self.spec = load_spec(model_dir)
        self.model = InferenceModel(self.spec, load_weights(model_dir), dtype)
        self.kv = KVCacheManager(num_blocks, block_size)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, num_blocks, block_size, dtype)
        self._next_id = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[list[Completion]]:
        """`params.n` completions of each token-id prompt, all scheduled together (siblings share the prompt's
        cached blocks)."""
        params = params or SamplingParams()
        max_tokens = params.max_tokens
        ids = []
        for prompt in prompts:
            if not prompt or len(prompt) + max_tokens > self.spec.max_position_embeddings:
                raise RungError(f"a prompt of {len(prompt)} tokens plus max_tokens {max_tokens} does not fit the "
                                f"context window ({self.spec.max_position_embeddings})")
            if len(prompt) + max_tokens > self.kv.num_blocks * self.kv.block_size:
                raise RungError(f"a prompt of {len(prompt)} tokens plus max_tokens {max_tokens} exceeds the whole KV "
                                f"cache ({self.kv.num_blocks} blocks of {self.kv.block_size}): raise num_blocks")
            if max(prompt) >= self.spec.vocab_size or min(prompt) < 0:
                raise RungError(f"token ids must be in [0, {self.spec.vocab_size})")
        for prompt in prompts:
            siblings = []
            for index in range(params.n):
                request_id = f"req-{self._next_id}"
                self._next_id += 1
                seed = None if params.seed is None else params.seed + index  # n distinct, reproducible streams
                self.scheduler.add(Request(request_id, list(prompt), replace(params, seed=seed),
                                           eos_token_ids=frozenset(self.spec.eos_token_ids)))
                siblings.append(request_id)
            ids.append(siblings)
        outputs: dict[str, Completion] = {}
        logprobs: dict[str, list[float]] = {}
        while self.scheduler.has_work:
            plan = self.scheduler.schedule()
            samples = self.runner.run(plan)
            for request_id, sample in samples.items():
                logprobs.setdefault(request_id, []).append(sample.logprob)
            for request in self.scheduler.update(plan, {k: v.token_id for k, v in samples.items()}):
                self.runner.release(request.request_id)
                outputs[request.request_id] = Completion(request.output_token_ids, logprobs.pop(request.request_id),
                                                         request.status.value)
        return [[outputs[request_id] for request_id in siblings] for siblings in ids]
