"""SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in the eigenbasis of
Shampoo's factors. With L, R and M of `kronecker.py`, Q_L and Q_R the factors' eigenvectors (refreshed every
`precondition_every` steps, kept between) and V Adam's second moment of the rotated gradient:

    G′ = Q_Lᵀ·G·Q_R,   V ← β₂·V + (1−β₂)·G′²,
    D = Q_L · ( (Q_Lᵀ·M·Q_R) / (1−β₁ᵗ) ÷ (√(V / (1−β₂ᵗ)) + ε) ) · Q_Rᵀ      (ε the group's "eps")

M stays in the parameter's own coordinates and is rotated when used; V stays in the rotated ones and is kept when
the basis is refreshed (eigenvalues sorted ascending each time, so a coordinate keeps its place in the spectrum), as
the authors' implementation keeps it. Eigenbases come from a full eigendecomposition rather than the authors' one
power-iteration step with QR: the factors here are at most a few thousand wide, and the refresh is every 10 steps.
"""

from __future__ import annotations

import torch

from rung.jobs.train.kronecker import KroneckerFactored, eigh


class SOAP(KroneckerFactored):
    """SOAP over groups of 2-D parameters; each group has "lr", "weight_decay" and "eps"."""

    STATE = (*KroneckerFactored.STATE, "left_basis", "right_basis", "second_moment")
    GROUP_KEY = "eps"

    @staticmethod
    def extra_shapes(out: int, into: int) -> dict[str, tuple[int, int]]:
        return {"left_basis": (out, out), "right_basis": (into, into), "second_moment": (out, into)}

    def refresh(self, state: dict, group: dict, step: int) -> None:
        for side in ("left", "right"):  # eigenvectors do not depend on the bias correction's scale
            state[f"{side}_basis"].copy_(eigh(state[side])[1].to(state[side].dtype))

    def direction(self, state: dict, group: dict, grad: torch.Tensor, step: int) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        left, right = state["left_basis"], state["right_basis"]
        rotated = left.T @ grad @ right
        state["second_moment"].mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
        momentum = left.T @ state["momentum"] @ right / (1 - beta1 ** step)
        scale = (state["second_moment"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
        return left @ (momentum / scale) @ right.T
