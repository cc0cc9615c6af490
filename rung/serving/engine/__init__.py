"""rung's engine: the step loop, where it runs (a thread or a process of its own), the typed messages it exchanges
with the server, and the EngineClient the API sees."""
