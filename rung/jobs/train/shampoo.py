"""Shampoo (Gupta, Koren & Singer, 2018) for weight matrices, as Ishikawa & Karakida analyse it for μP: the update of
a matrix W [out, in] with gradient G is L̂^(−¼)·M̂·R̂^(−¼), where

    L ← β₂·L + (1−β₂)·G·Gᵀ,   R ← β₂·R + (1−β₂)·Gᵀ·G       (the Kronecker factors, exponential averages)
    M ← β₁·M + (1−β₁)·G                                    (momentum of the gradient)
    L̂ = L / (1−β₂ᵗ) + ρ·I,  R̂ likewise, M̂ = M / (1−β₁ᵗ)     (bias-corrected; ρ the group's "damping")
    W ← W·(1 − η·λ) − η · L̂^(−¼)·M̂·R̂^(−¼)                   (decoupled weight decay λ)

The inverse fourth roots come from an eigendecomposition (in float64: the factors' small eigenvalues are where the
damping acts) on the first step and every `precondition_every` steps after, and are kept in between. Between
refreshes a gradient direction the roots have not seen is scaled by up to ρ^(−½): with ρ = 1e-6 the coordinate check
grew with width under μP (slopes +0.7) until the roots were refreshed every step (slopes ±0.03); ρ = 1e-4 or 1e-3
keeps it flat at 10 steps per refresh, and 1e-3 trained `tiny` best of the three (validation 4.53 vs 4.58 and 4.70
after 60 steps) — hence rung's default of 1e-3 where Shampoo's own implementations, which graft their update onto
Adam's norm, use far smaller values.

Why rung's own: the maintained registry implementations (pytorch_optimizer's Shampoo and SOAP) keep their factors
as Python lists, None placeholders and floats in the optimizer state, which rung's pickle-free checkpoints (one named
tensor per state entry) cannot hold; every state entry here is a tensor of a fixed name and shape.

DeepSpeed's unfused bf16 optimizer (ZeRO-0) steps the optimizer once with all-zero gradients when it is built, to
create its state; Shampoo takes such a first step as no step, rather than compute its roots from empty factors.
"""

from __future__ import annotations

import torch

SHAMPOO_STATE = ("momentum", "left", "right", "left_root", "right_root")


class Shampoo(torch.optim.Optimizer):
    """Shampoo over groups of 2-D parameters; each group has "lr", "weight_decay" and "damping"."""

    def __init__(self, groups: list[dict], betas: tuple[float, float], precondition_every: int):
        super().__init__(groups, {"betas": betas, "precondition_every": precondition_every, "weight_decay": 0.0})
        for group in self.param_groups:
            if group["damping"] <= 0:
                raise ValueError(f"Shampoo's damping must be > 0, got {group['damping']}")
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Shampoo steps matrices (2-D parameters) only")

    @staticmethod
    def initial_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
        """A parameter's state before its first step: zero factors, momentum and roots (its first step computes the
        roots)."""
        out, into = param.shape
        zeros = dict(dtype=torch.float32, device=param.device)
        return {"step": torch.tensor(0.0), "momentum": torch.zeros(out, into, **zeros),
                "left": torch.zeros(out, out, **zeros), "right": torch.zeros(into, into, **zeros),
                "left_root": torch.zeros(out, out, **zeros), "right_root": torch.zeros(into, into, **zeros)}

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        fresh = all(not self.state[p] or float(self.state[p]["step"]) == 0 for p in params)
        if fresh and not any(bool(p.grad.any()) for p in params):
            return loss  # DeepSpeed's zero-gradient step at construction (module docstring)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self.initial_state(param))
                state["step"] += 1
                step = int(state["step"])
                grad = param.grad.float()
                state["left"].mul_(beta2).addmm_(grad, grad.T, alpha=1 - beta2)
                state["right"].mul_(beta2).addmm_(grad.T, grad, alpha=1 - beta2)
                state["momentum"].mul_(beta1).add_(grad, alpha=1 - beta1)
                if (step - 1) % group["precondition_every"] == 0:
                    correction = 1 - beta2 ** step
                    state["left_root"].copy_(_inverse_fourth_root(state["left"] / correction, group["damping"]))
                    state["right_root"].copy_(_inverse_fourth_root(state["right"] / correction, group["damping"]))
                update = state["left_root"] @ state["momentum"] @ state["right_root"] / (1 - beta1 ** step)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-group["lr"])
        return loss


def _inverse_fourth_root(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """(factor + damping·I)^(−¼) of a symmetric positive semi-definite factor, by eigendecomposition in float64."""
    matrix = factor.double()
    matrix = (matrix + matrix.T) / 2 + damping * torch.eye(len(matrix), dtype=matrix.dtype, device=matrix.device)
    values, vectors = torch.linalg.eigh(matrix)
    roots = values.clamp(min=damping) ** -0.25
    return ((vectors * roots) @ vectors.T).to(factor.dtype)
