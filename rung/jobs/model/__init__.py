"""The model family: a pre-norm decoder-only transformer, dense or Mixture-of-Experts, and its counts."""
