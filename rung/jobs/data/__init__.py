"""Data: corpora → tokenizer → memory-mapped token shards → deterministic sequence batches."""
