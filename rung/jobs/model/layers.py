"""Transformer building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

Each layer tags its parameters with a role (rung.jobs.params.roles) and takes its forward multipliers as plain numbers, so
no layer knows which parametrization is in force.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rung.jobs.params.roles import Role, tag


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, role: Role):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        tag(self, role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 as Hugging Face Llama does, so exported models match to rounding.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_len, head_dim] in fp32, laid out for the rotate-half convention Llama checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.int64).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions; logits scaled by `scale` (μP: ∝ 1/d_head)."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.scale = n_heads, n_kv_heads, head_dim, scale
        self.q_proj = tag(nn.Linear(d_model, n_heads * head_dim, bias=False), Role.HIDDEN)
        self.k_proj = tag(nn.Linear(d_model, n_kv_heads * head_dim, bias=False), Role.HIDDEN)
        self.v_proj = tag(nn.Linear(d_model, n_kv_heads * head_dim, bias=False), Role.HIDDEN)
        self.o_proj = tag(nn.Linear(n_heads * head_dim, d_model, bias=False), Role.HIDDEN)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                             enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = tag(nn.Linear(d_model, hidden, bias=False), Role.HIDDEN)
        self.up_proj = tag(nn.Linear(d_model, hidden, bias=False), Role.HIDDEN)
        self.down_proj = tag(nn.Linear(hidden, d_model, bias=False), Role.HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
