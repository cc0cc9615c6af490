"""`rung serve --engine vllm`: vLLM's AsyncLLM behind rung's server, so its API, auth, queue bound, drain and
`rung_serve_*` metrics stay the same whichever engine computes. It implements the server's `EngineClient`
(`engine/client.py`), as rung's own AsyncEngine does: validate, generate (an async iterator of Outputs with abort),
health and queue counts.

vLLM is an optional extra (`pip install 'rung[vllm]'` where vLLM supports the machine); without it the server
refuses to start with a message saying so. vLLM detokenizes and matches stop strings itself; rung keeps each
request's latency clock and reads the engine's gauges (running, waiting, KV usage, prefix cache, preemptions) from
vLLM's stat-logger hook. Step time and nano-batch metrics stay at zero: vLLM does not report them.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncGenerator

from rung.errors import ConfigError
from rung.serving.config import EngineConfig
from rung.serving.core.outputs import Sample
from rung.serving.core.params import SamplingParams
from rung.serving.core.request import Status
from rung.serving.core.structured import StructuredOutput
from rung.serving.core.validation import validate_request
from rung.serving.engine.client import EngineFailure, Output
from rung.serving.metrics import RequestClock, ServeMetrics


def import_vllm():
    """vLLM's engine classes, or a ConfigError saying how to get them (checked before any model loads)."""
    try:
        import vllm  # noqa: F401
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
    except ImportError as err:
        raise ConfigError("engine", f"vllm cannot be imported here ({err}); install the extra where vLLM supports "
                                    "the machine: pip install 'rung[vllm]'") from None
    return AsyncEngineArgs, AsyncLLM, StatLoggerBase


def vllm_structured_outputs(structured: StructuredOutput | None):
    """rung's constraint as vLLM's StructuredOutputsParams (vLLM picks its own grammar engine; a `grammar` is
    passed as written, so it must be in a dialect that engine reads)."""
    if structured is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    spec = structured.spec
    fields = {"json_object": {"json_object": True}, "json_schema": {"json": spec}, "regex": {"regex": spec},
              "choice": {"choice": json.loads(spec) if spec else []}, "grammar": {"grammar": spec}}
    return StructuredOutputsParams(**fields[structured.kind])


class VLLMAsyncEngine:
    """vLLM's AsyncLLM as an EngineClient."""

    def __init__(self, model_dir: str, config: EngineConfig, metrics: ServeMetrics | None = None):
        AsyncEngineArgs, AsyncLLM, StatLoggerBase = import_vllm()
        self.metrics = metrics
        self._handles: dict[str, VLLMRequestHandle] = {}
        self._ids = itertools.count()
        self._totals = {"queries": 0, "hits": 0, "preemptions": 0}
        engine = self

        class Gauges(StatLoggerBase):
            """vLLM's per-iteration scheduler stats into rung's engine gauges and counters."""

            def __init__(self, vllm_config, engine_index: int = 0):
                self.block_size = vllm_config.cache_config.block_size

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                totals = engine._totals
                if iteration_stats is not None:
                    totals["preemptions"] += iteration_stats.num_preempted_reqs
                if scheduler_stats is None or engine.metrics is None:
                    return
                prefix = scheduler_stats.prefix_cache_stats  # in tokens; rung counts blocks
                totals["queries"] += prefix.queries // self.block_size
                totals["hits"] += prefix.hits // self.block_size
                engine.metrics.observe_engine(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                                              scheduler_stats.kv_cache_usage, totals["queries"], totals["hits"],
                                              totals["preemptions"])

            def log_engine_initialized(self):
                pass

        args = AsyncEngineArgs(model=str(model_dir), dtype=config.dtype, block_size=config.block_size,
                               max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                               max_model_len=config.max_model_len, kv_cache_memory_bytes=config.kv_cache_memory,
                               gpu_memory_utilization=config.gpu_memory_utilization,
                               enforce_eager=config.enforce_eager,
                               scheduling_policy="priority", seed=0, async_scheduling=config.async_scheduling,
                               enable_prefix_caching=config.enable_prefix_caching,
                               tensor_parallel_size=config.tensor_parallel_size)
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=[Gauges])

    @property
    def max_model_len(self) -> int:
        return self.llm.model_config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.llm.model_config.get_vocab_size()

    def start(self) -> None:
        """vLLM's engine started when it loaded."""

    def stop(self) -> None:
        self.llm.shutdown()

    @property
    def healthy(self) -> bool:
        return not self.llm.errored

    @property
    def num_unfinished(self) -> int:
        return len(self._handles)

    @property
    def num_waiting(self) -> int:
        """Requests that have produced nothing yet (vLLM does not say which of them are prefilling)."""
        return sum(1 for h in self._handles.values() if h.clock.last_token is None)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(h.clock.prompt_tokens for h in self._handles.values() if h.clock.last_token is None)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.max_model_len, self.vocab_size)

    def describe(self) -> str:
        return f"vLLM {__import__('vllm').__version__} engine"

    def generate(self, prompt_token_ids: list[int], params: SamplingParams, stop: list[str] | tuple = (),
                 priority: int = 0) -> VLLMRequestHandle:
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.validate(prompt_token_ids, params)
        request_id = f"r{next(self._ids)}"
        sampling = VLLMSamplingParams(
            n=1, max_tokens=params.max_tokens, min_tokens=params.min_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=max(params.top_k, 0), min_p=params.min_p, seed=params.seed,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty, stop=list(stop), stop_token_ids=list(params.stop_token_ids),
            logit_bias=dict(params.logit_bias) or None,
            ignore_eos=params.ignore_eos, logprobs=params.logprobs or 0, output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=params.skip_special_tokens,
            spaces_between_special_tokens=params.spaces_between_special_tokens,
            structured_outputs=vllm_structured_outputs(params.structured))
        outputs = self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_token_ids)), sampling, request_id,
                                    priority=priority)
        handle = VLLMRequestHandle(self, request_id, outputs, RequestClock(self.metrics, len(prompt_token_ids)),
                                   params.logprobs or 0)
        self._handles[request_id] = handle
        return handle


class VLLMRequestHandle:
    """One request's outputs as a RequestStream."""

    def __init__(self, engine: VLLMAsyncEngine, request_id: str, outputs: AsyncGenerator, clock: RequestClock,
                 top: int):
        self.engine, self.request_id, self.outputs, self.clock, self.top = engine, request_id, outputs, clock, top
        self.num_output_tokens = 0
        self.finished = False

    def __aiter__(self) -> VLLMRequestHandle:
        return self

    async def __anext__(self) -> Output:
        if self.finished:
            raise StopAsyncIteration
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        try:
            result = await self.outputs.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        except (EngineDeadError, EngineGenerateError) as err:
            self._end()
            raise EngineFailure(f"vLLM's engine failed: {' '.join(str(err).split())[:300]}") from None
        completion = result.outputs[0]
        samples = []
        for index, token_id in enumerate(completion.token_ids):
            self.clock.token()
            ranked = completion.logprobs[index] if completion.logprobs else {}
            chosen = ranked.get(token_id)
            samples.append(Sample(token_id, chosen.logprob if chosen else None,
                                  {t: lp.logprob for t, lp in ranked.items() if lp.rank is not None
                                   and lp.rank <= self.top}))
        self.num_output_tokens += len(completion.token_ids)
        reason = completion.finish_reason if result.finished else None
        if reason is not None:
            self.clock.finish(reason, self.num_output_tokens)
            self._end()
        return Output(completion.text, list(completion.token_ids), samples, reason, self.clock.prompt_tokens,
                      self.num_output_tokens)

    def abort(self) -> None:
        """Stop the request if it is still going (idempotent): vLLM frees its blocks."""
        if self.finished:
            return
        self._end()
        self.clock.finish(Status.FINISHED_ABORTED.value, self.num_output_tokens)
        asyncio.get_running_loop().create_task(self.engine.llm.abort(self.request_id))

    def _end(self) -> None:
        self.finished = True
        self.engine._handles.pop(self.request_id, None)
