"""The offline engine: `LLM(model_dir).generate(prompts, SamplingParams(...))` steps the engine until every
request finishes — for batch jobs, tests and benchmarks. Prompts are token ids; every request is validated before
any is scheduled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rung.serving.async_engine import seeded
from rung.serving.engine import Engine, EngineConfig
from rung.serving.params import SamplingParams


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None  # of each chosen token under the model, when SamplingParams.logprobs is set
    finish_reason: str  # "stop" or "length"


class LLM:
    def __init__(self, model_dir: str | Path, num_blocks: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048, dtype: str = "float32",
                 nano_batches: int | None = None, deterministic: bool = False, device: str | None = None,
                 async_scheduling: bool | None = None):
        self.engine = Engine(model_dir, EngineConfig(dtype=dtype, block_size=block_size, num_blocks=num_blocks,
                                                     max_num_seqs=max_num_seqs,
                                                     max_num_batched_tokens=max_num_batched_tokens,
                                                     nano_batches=nano_batches, deterministic=deterministic,
                                                     device=device, async_scheduling=async_scheduling))
        self.spec, self.kv, self.scheduler = self.engine.spec, self.engine.kv, self.engine.scheduler
        self._next_id = 0

    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None) -> list[list[Completion]]:
        """`params.n` completions of each token-id prompt, all scheduled together (siblings share the prompt's
        cached blocks)."""
        params = params or SamplingParams()
        for prompt in prompts:
            self.engine.validate(prompt, params)
        ids = []
        for prompt in prompts:
            siblings = []
            for index in range(params.n):
                request_id = f"req-{self._next_id}"
                self._next_id += 1
                self.engine.add(request_id, prompt, seeded(params, index))
                siblings.append(request_id)
            ids.append(siblings)
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[float]] = {}
        reasons: dict[str, str] = {}
        while self.engine.has_work:
            for event in self.engine.step():
                tokens.setdefault(event.request_id, []).append(event.token_id)
                if params.logprobs is not None:
                    logprobs.setdefault(event.request_id, []).append(event.sample.logprob)
                if event.finish_reason:
                    reasons[event.request_id] = event.finish_reason
        return [[Completion(tokens[i], logprobs.get(i), reasons[i]) for i in siblings] for siblings in ids]
