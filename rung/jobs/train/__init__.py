"""The DeepSpeed training loop and its components: engine, step, guard, checkpointer, metrics."""
