"""The inference engine and OpenAI-compatible server. Built so far: the paged KV-cache manager (kv_cache.py);
the scheduler, runner, model loading, sampling and HTTP API are the engine and serving issues' remaining work."""
