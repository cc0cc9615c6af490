"""Shampoo (Gupta, Koren & Singer, 2018) for weight matrices, as Ishikawa & Karakida analyse it for μP: with the
Kronecker factors L, R and momentum M of `kronecker.py`, the direction is

    D = L̂^(−¼) · M̂ · R̂^(−¼),   L̂ = L / (1−β₂ᵗ) + ρ·I,  R̂ likewise,  M̂ = M / (1−β₁ᵗ)     (ρ the group's "damping")

with the inverse fourth roots kept between refreshes. Between refreshes a gradient direction the roots have not seen
is scaled by up to ρ^(−½): with ρ = 1e-6 the coordinate check grew with width under μP (slopes +0.7) until the roots
were refreshed every step (slopes ±0.03); ρ = 1e-4 or 1e-3 keeps it flat at 10 steps per refresh, and 1e-3 trained
`tiny` best of the three (validation 4.53 vs 4.58 and 4.70 after 60 steps) — hence rung's default of 1e-3 where
Shampoo's own implementations, which graft their update onto Adam's norm, use far smaller values.
"""

from __future__ import annotations

import torch

from rung.jobs.train.kronecker import KroneckerFactored, eigh


class Shampoo(KroneckerFactored):
    """Shampoo over groups of 2-D parameters; each group has "lr", "weight_decay" and "damping"."""

    STATE = (*KroneckerFactored.STATE, "left_root", "right_root")
    GROUP_KEY = "damping"

    def state_shapes(self, out: int, into: int) -> dict[str, tuple[int, ...]]:
        return {**super().state_shapes(out, into), "left_root": (out, out), "right_root": (into, into)}

    def refresh(self, state: dict, group: dict, step: int) -> None:
        correction = 1 - group["betas"][1] ** step
        for side in ("left", "right"):
            state[f"{side}_root"].copy_(_inverse_fourth_root(state[side] / correction, group["damping"]))

    def direction(self, state: dict, group: dict, grad: torch.Tensor, step: int) -> torch.Tensor:
        return state["left_root"] @ state["momentum"] @ state["right_root"] / (1 - group["betas"][0] ** step)


def _inverse_fourth_root(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """(factor + damping·I)^(−¼) of a symmetric positive semi-definite factor."""
    values, vectors = eigh(factor, damping)
    return ((vectors * values.clamp(min=damping) ** -0.25) @ vectors.T).to(factor.dtype)
