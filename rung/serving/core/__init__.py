"""Torch-free: what a request is, its sampling parameters and outputs, the rules it must meet, the paged KV cache's
accounting and the continuous-batching scheduler."""
