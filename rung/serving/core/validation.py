"""The rules a request must meet before anything is scheduled, for both serving engines (rung's and vLLM's): one
rule set, torch-free, so the API layer checks a request before it reaches an engine process."""

from __future__ import annotations

from rung.serving.core.params import SamplingError, SamplingParams


def validate_request(prompt_token_ids: list[int], params: SamplingParams, window: int, vocab_size: int,
                     kv_blocks: tuple[int, int] | None = None) -> None:
    """Refuse, naming the field (SamplingError), a request that can never run: an empty prompt, one that does not
    fit the context window with its max_tokens, prompt or stop token ids outside the vocabulary, or (given `kv_blocks`, the pool's
    block count and size) one longer than the whole KV cache. One rule set for both serving engines."""
    if not prompt_token_ids:
        raise SamplingError("prompt", "is empty")
    if len(prompt_token_ids) >= window:
        raise SamplingError("prompt", f"has {len(prompt_token_ids)} tokens; the context window is {window}")
    if len(prompt_token_ids) + params.max_tokens > window:
        raise SamplingError("max_tokens", f"{params.max_tokens} plus the prompt's {len(prompt_token_ids)} tokens "
                            f"exceeds the context window of {window}")
    if kv_blocks and len(prompt_token_ids) + params.max_tokens > kv_blocks[0] * kv_blocks[1]:
        raise SamplingError("max_tokens", f"{params.max_tokens} plus the prompt's {len(prompt_token_ids)} tokens "
                            f"exceeds the whole KV cache ({kv_blocks[0]} blocks of {kv_blocks[1]})")
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        raise SamplingError("prompt", f"token ids must be in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t in params.stop_token_ids):
        raise SamplingError("stop_token_ids", f"token ids must be in [0, {vocab_size})")
    if any(not 0 <= t < vocab_size for t, _bias in params.logit_bias):
        raise SamplingError("logit_bias", f"token ids must be in [0, {vocab_size})")
