"""The inference engine and OpenAI-compatible server. Built so far: request state, the paged KV-cache manager,
the continuous-batching scheduler (all torch-free), inference modules for Llama/Mistral/Qwen2/Mixtral/Granite
folders over a paged cache, the runner and a greedy offline `LLM`. Sampling, async overlap, nano-batching and the
HTTP API are the engine and serving issues' remaining work."""
