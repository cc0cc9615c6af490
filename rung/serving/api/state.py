"""What every route shares: the config, the tokenizer, the engine (an EngineClient), the metrics and the
lifecycle flags — and the checks each generation request passes before it reaches the engine."""

from __future__ import annotations

import asyncio

from rung.errors import ConfigError, RungError
from rung.serving.api.errors import APIError
from rung.serving.api.protocol import ChatMessage, Sampling
from rung.serving.api.streaming import OpenRequests
from rung.serving.api.tool_calls import TOOL_CALL_FORMATS, format_for_template
from rung.serving.config import ServeConfig
from rung.serving.core.structured import StructuredOutput
from rung.serving.engine.client import EngineClient, RequestStream
from rung.serving.metrics import ServeMetrics

OFFLOAD_CHARS = 4096  # longer texts are tokenized on a worker thread (the tokenizer lets go of the GIL), so one
# huge prompt cannot stall the event loop and every other stream and probe with it


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as err:  # transformers' ways of saying the folder has no usable tokenizer
        reason = " ".join(str(err).split())
        raise RungError(f"{model_dir} has no tokenizer rung can load: {reason[:300]}") from None


class ServerState:
    def __init__(self, config: ServeConfig, tokenizer, engine: EngineClient, metrics: ServeMetrics,
                 quantization: str = "none"):
        self.config, self.tokenizer, self.engine, self.metrics = config, tokenizer, engine, metrics
        self.quantization = quantization  # how the served weights are held (`/v1/models` reports it)
        self.ready = False
        self.draining = False
        self.open_requests = OpenRequests()  # what a drain's end cuts off
        named = config.tool_call_parser
        if named is not None and named not in TOOL_CALL_FORMATS:
            raise ConfigError("tool_call_parser", f"unknown format {named!r}; known: {', '.join(TOOL_CALL_FORMATS)}")
        self.tool_format = TOOL_CALL_FORMATS[named] if named else \
            format_for_template(getattr(tokenizer, "chat_template", None))

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.config.model_name:
            raise APIError(404, f"model {model[:100]!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", param="model", code="model_not_found")

    def check_capacity(self, requests: int, tokens: int) -> None:
        if requests > self.config.max_queued_requests:  # a 429 would send the SDK retrying what can never fit
            raise APIError(400, f"the request asks for {requests} completions (n × prompts); this server queues "
                                f"{self.config.max_queued_requests} at most", param="n")
        if self.draining or not self.ready:
            raise APIError(503, "the server is " + ("draining" if self.draining else "starting"),
                           type_="service_unavailable", headers={"Retry-After": "5"})
        if self.engine.num_waiting + requests > self.config.max_queued_requests:
            raise APIError(429, f"the queue is full ({self.config.max_queued_requests} waiting requests); retry "
                                f"later", type_="rate_limit_error", headers={"Retry-After": "1"})
        limit = self.config.max_queued_tokens
        if limit is not None and self.engine.num_waiting_tokens + tokens > limit:
            raise APIError(429, f"the queue is full ({limit} prompt tokens waiting at most); retry later",
                           type_="rate_limit_error", headers={"Retry-After": "1"})

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > OFFLOAD_CHARS:
            return await asyncio.to_thread(self._encode, text, add_special_tokens)
        return self._encode(text, add_special_tokens)

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    async def chat_prompt(self, messages: list[ChatMessage], functions: list[dict] | None = None) -> list[int]:
        """The conversation through the model's chat template; `functions` (OpenAI function objects) are given to
        the template as its `tools`."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "this model has no chat template; use /v1/completions", param="messages")
        from jinja2 import TemplateError

        tools = [{"type": "function", "function": f} for f in functions] if functions else None
        try:
            text = self.tokenizer.apply_chat_template([m.for_template() for m in messages], tools=tools,
                                                      tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # the template refuses these messages (an order of roles it does not know)
            raise APIError(400, f"the chat template refused the messages: {err}"[:500], param="messages") from None
        return await self.encode(text, add_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def max_tokens(self, prompt: list[int], requested: int | None) -> int:
        """The request's max_tokens, or the rest of the context window when it gives none."""
        window = self.engine.max_model_len
        if requested is not None:
            return requested
        if len(prompt) >= window:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; the context window is {window}",
                           param="prompt")
        return window - len(prompt)

    def start(self, request: Sampling, prompts: list[list[int]], requested: int | None,
              logprobs: int | None, tool_calls: StructuredOutput | None = None) -> list[RequestStream]:
        """Validate everything, then start n streams per prompt (nothing is queued if any part is invalid).
        `tool_calls`: the grammar a required or named tool call holds the output to."""
        self.check_model(request.model)
        plans = []
        for prompt in prompts:
            params = request.sampling_params(self.max_tokens(prompt, requested), logprobs, tool_calls)
            self.engine.validate(prompt, params)
            plans.extend((prompt, params.for_sample(i)) for i in range(request.n))
        self.check_capacity(len(plans), sum(len(prompt) for prompt, _ in plans))
        return [self.engine.generate(p, params, request.stop_strings(), request.priority) for p, params in plans]
