"""The compute side: a Hugging Face folder's model on a device over the paged KV pool, the runner that turns a step
plan into one forward pass, the sampler, and the nano-batch tuner."""
