"""The inference engine and OpenAI-compatible server. Built so far: request state (request.py), the paged
KV-cache manager (kv_cache.py) and the continuous-batching scheduler (scheduler.py), all torch-free; the runner,
model loading, sampling and HTTP API are the engine and serving issues' remaining work."""
