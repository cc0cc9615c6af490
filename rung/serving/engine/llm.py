"""The offline engine: `LLM(model_dir).generate(prompts, SamplingParams(...))` steps the engine until every
request finishes — for batch jobs, tests and benchmarks. Prompts are token ids; every request is validated before
any is scheduled."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rung.serving.config import EngineConfig, engine_config
from rung.serving.core.params import SamplingParams
from rung.serving.engine.engine import Engine


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float] | None  # of each chosen token under the model, when SamplingParams.logprobs is set
    finish_reason: str  # "stop" or "length"


class LLM:
    def __init__(self, model_dir: str | Path, config: EngineConfig | None = None, **settings):
        """`settings`: EngineConfig fields (`LLM(folder, num_blocks=64, max_num_seqs=8)`), checked like every
        config (a bad one is a ConfigError naming it); or a whole `config`."""
        if config is not None and settings:
            raise TypeError("give LLM either a config or settings, not both")
        self.engine = Engine(model_dir, engine_config(settings) if config is None else config)
        self.spec, self.kv, self.scheduler = self.engine.spec, self.engine.kv, self.engine.scheduler
        self._next_id = 0

    def close(self) -> None:
        """Stop what the engine started (tensor-parallel workers, a compute thread); `with LLM(...) as llm:` does
        it on leaving."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[list[Completion]]:
        """`params.n` completions of each token-id prompt, all scheduled together (siblings share the prompt's
        cached blocks). `params`: one for every prompt, or a list with one per prompt (as vLLM's `generate`)."""
        each = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(each) != len(prompts):
            raise ValueError(f"{len(each)} sampling params for {len(prompts)} prompts: give one, or one per prompt")
        for prompt, prompt_params in zip(prompts, each):
            self.engine.validate(prompt, prompt_params)
        ids, wants_logprobs = [], set()
        for prompt, params in zip(prompts, each):
            siblings = []
            for index in range(params.n):
                request_id = f"req-{self._next_id}"
                self._next_id += 1
                self.engine.add(request_id, prompt, params.for_sample(index))
                siblings.append(request_id)
                if params.logprobs is not None:
                    wants_logprobs.add(request_id)
            ids.append(siblings)
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list[float]] = {}
        reasons: dict[str, str] = {}
        while self.engine.has_work:
            for event in self.engine.step():
                tokens.setdefault(event.request_id, []).append(event.token_id)
                if event.request_id in wants_logprobs:
                    logprobs.setdefault(event.request_id, []).append(event.sample.logprob)
                if event.finish_reason:
                    reasons[event.request_id] = event.finish_reason
        return [[Completion(tokens[i], logprobs.get(i), reasons[i]) for i in siblings] for siblings in ids]
