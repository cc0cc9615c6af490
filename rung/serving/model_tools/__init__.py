"""Commands over a model folder that run rung's inference model outside a server: `rung eval` (perplexity on
held-out text) and `rung quantize` (a folder rewritten with low-bit projections, bits allocated by measured
sensitivity)."""
