"""What Shampoo, SOAP and K-FAC share: for each weight matrix W [out, in] with gradient G, two Kronecker factors and
a momentum — for Shampoo and SOAP the factors of the gradient's second moment,

    L ← β₂·L + (1−β₂)·G·Gᵀ,   R ← β₂·R + (1−β₂)·Gᵀ·G,   M ← β₁·M + (1−β₁)·G,

for K-FAC those of its layer's output gradients and inputs (`update_factors`); SOAP keeps them per tile — a
preconditioner derived from L and R by eigendecomposition (in float64: the small eigenvalues are where damping and ε
act) on the first step and every `precondition_every` steps after, kept in between, and the decoupled update
W ← W·(1 − η·λ) − η·D, D the subclass's direction (`shampoo.py`, `soap.py`, `kfac.py`). Shampoo and K-FAC refresh
before the step's direction (`advance`); SOAP after it, as its paper orders it.

Why rung's own: the maintained registry implementations (pytorch_optimizer's Shampoo and SOAP) keep their factors as
Python lists, None placeholders and floats in the optimizer state, which rung's pickle-free checkpoints (one named
tensor per state entry) cannot hold; here every state entry is a tensor of a fixed name and shape (`STATE`).

DeepSpeed's unfused bf16 optimizer (ZeRO-0) steps the optimizer once with all-zero gradients when it is built, to
create its state; these optimizers take such a first step as no step, rather than derive a preconditioner from empty
factors.
"""

from __future__ import annotations

import torch


class KroneckerFactored(torch.optim.Optimizer):
    """The shared step over groups of 2-D parameters; each group has "lr" and "weight_decay", and what the subclass
    names in `GROUP_KEY` (its damping or ε)."""

    STATE: tuple[str, ...] = ("momentum", "left", "right")  # a subclass adds its preconditioner's tensors
    HOST_STATE: tuple[str, ...] = ()  # scalars of STATE the host reads every step: kept there, not on the device
    GROUP_KEY = ""

    def __init__(self, groups: list[dict], betas: tuple[float, float], precondition_every: int):
        super().__init__(groups, {"betas": betas, "precondition_every": precondition_every, "weight_decay": 0.0})
        name = type(self).__name__
        for group in self.param_groups:
            if not group[self.GROUP_KEY] > 0:
                raise ValueError(f"{name}'s {self.GROUP_KEY} must be > 0, got {group[self.GROUP_KEY]}")
            if any(p.dim() != 2 for p in group["params"]):
                raise ValueError(f"{name} steps matrices (2-D parameters) only")

    def initial_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """A parameter's state before its first step: every tensor zero (the first step derives the
        preconditioner)."""
        shapes = self.state_shapes(*param.shape)
        return {"step": torch.tensor(0.0),
                **{key: torch.zeros(shapes[key], dtype=torch.float32,
                                    device="cpu" if key in self.HOST_STATE else param.device) for key in self.STATE}}

    def state_shapes(self, out: int, into: int) -> dict[str, tuple[int, ...]]:
        """The shape of each STATE tensor for a weight [out, into]: here the momentum its own and the factors square;
        a subclass adds its own tensors' shapes."""
        return {"momentum": (out, into), "left": (out, out), "right": (into, into)}

    def update_factors(self, state: dict, grad: torch.Tensor, beta2: float, slot: tuple[int, int]) -> None:
        """Fold this step's statistics into the factors: here the gradient's own, GGᵀ and GᵀG (`slot`, the
        parameter's group index and position, names it for a subclass whose statistics come from elsewhere)."""
        state["left"].mul_(beta2).addmm_(grad, grad.T, alpha=1 - beta2)
        state["right"].mul_(beta2).addmm_(grad.T, grad, alpha=1 - beta2)

    def refresh_due(self, state: dict, step: int, every: int) -> bool:
        """Whether this step derives the preconditioner anew: the first step and every `every` after it."""
        return (step - 1) % every == 0

    def refresh(self, state: dict, group: dict, step: int) -> None:
        """Derive the preconditioner from the factors (bias-corrected by 1 − β₂ᵗ)."""
        raise NotImplementedError

    def direction(self, state: dict, group: dict, grad: torch.Tensor, step: int) -> torch.Tensor:
        """The update direction D of this step."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        fresh = all(not self.state[p] or float(self.state[p]["step"]) == 0 for p in params)
        if fresh and not any(bool(p.grad.any()) for p in params):
            return loss  # DeepSpeed's zero-gradient step at construction (module docstring)
        for index, group in enumerate(self.param_groups):
            for position, param in enumerate(group["params"]):
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(self.initial_state(param))
                state["step"] += 1
                step = int(state["step"])
                update = self.advance(state, group, param.grad.float(), step, (index, position))
                if update is not None:
                    param.mul_(1 - group["lr"] * group["weight_decay"])
                    param.add_(update.to(param.dtype), alpha=-group["lr"])
        return loss

    def advance(self, state: dict, group: dict, grad: torch.Tensor, step: int,
                slot: tuple[int, int]) -> torch.Tensor | None:
        """Fold step `step`'s gradient into the state and return its update direction (None: no update). Here the
        factors and momentum first, then the preconditioner refreshed from them when due, so that a refresh step's
        own statistics shape its direction: Shampoo's and K-FAC's order."""
        beta1, beta2 = group["betas"]
        self.update_factors(state, grad, beta2, slot)
        state["momentum"].mul_(beta1).add_(grad, alpha=1 - beta1)
        if self.refresh_due(state, step, group["precondition_every"]):
            self.refresh(state, group, step)
        return self.direction(state, group, grad, step)


def eigh(factor: torch.Tensor, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric factor (or a batch of them) plus shift·I, computed in
    float64."""
    matrix = factor.double()
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return torch.linalg.eigh((matrix + matrix.mT) / 2 + shift * identity)
