"""rung's inference engine and its OpenAI-compatible server: core (torch-free request state, KV accounting,
scheduler), worker (the model on a device and its compute paths), engine (the step loop, its process, the async
client), api (HTTP), backends (vLLM behind the same API), deploy (Ray Serve). Layout: docs/architecture.md."""
