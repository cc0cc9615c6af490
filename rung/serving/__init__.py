"""The inference engine and OpenAI-compatible server (not built yet: see the engine and serving issues)."""
