"""Which scaled-dot-product-attention kernel training runs on, decided once at start-up and stated.

torch picks SDPA's kernel per call from the inputs (device, dtype, head dim, GQA); when no fused kernel accepts
them it silently falls back to the math path, which keeps the seq × seq scores and is several times slower on a
GPU. rung asks torch which kernel the model's attention gets, says it, and on a GPU refuses to start on the math
path rather than train slowly without a word.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from rung.errors import ConfigError
from rung.jobs.config import RunConfig


def attention_kernel(cfg: RunConfig, device: torch.device) -> SDPBackend:
    """The kernel torch chooses for a training-shaped call of this model's attention on `device`."""
    model = cfg.model
    dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else torch.float32
    seq = min(cfg.train.seq_len, 128)
    q = torch.empty(1, model.n_heads, seq, model.resolved_head_dim, dtype=dtype, device=device, requires_grad=True)
    kv = torch.empty(1, model.resolved_kv_heads, seq, model.resolved_head_dim, dtype=dtype, device=device)
    choice = torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, scale=1.0,
                                     enable_gqa=model.resolved_kv_heads != model.n_heads)
    return require_fused(SDPBackend(choice), device, cfg)


def require_fused(kernel: SDPBackend, device: torch.device, cfg: RunConfig) -> SDPBackend:
    if device.type == "cuda" and kernel == SDPBackend.MATH:
        raise ConfigError("model.head_dim", f"no fused attention kernel (flash, memory-efficient, cuDNN) accepts head "
                          f"dim {cfg.model.resolved_head_dim} in {cfg.train.dtype} with {cfg.model.n_heads} heads / "
                          f"{cfg.model.resolved_kv_heads} KV heads on this GPU; the math fallback would keep "
                          "seq x seq scores per head (use a head dim that is a multiple of 8, at most 256)")
    return kernel
