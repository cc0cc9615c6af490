"""SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"): Adam run in the eigenbasis of
Shampoo's factors. With L, R and M of `kronecker.py`, Q_L and Q_R the factors' eigenvectors and V Adam's second
moment of the rotated gradient, step t (n = t − 1 Adam steps so far, counting this one) is

    G′ = Q_Lᵀ·G·Q_R,   V ← β₂·V + (1−β₂)·G′²,
    D = Q_L · ( (Q_Lᵀ·M·Q_R) / (1−β₁ⁿ) ÷ (√(V / (1−β₂ⁿ)) + ε) ) · Q_Rᵀ      (ε the group's "eps")

and only then are L and R updated with G, and Q_L, Q_R refreshed from them (after the first step and every
`precondition_every` after it): the paper's Algorithm order and the authors' code's, which also spends the first
gradient on the basis alone (no update, no momentum).

How the update scales with width depends on how well the basis fits the gradient. In directions the basis already
holds, the rotated gradient is nearly diagonal — its singular values — and Adam's normalization turns that part of
the update into Q_L·Q_Rᵀ, Shampoo's spectral-norm-one direction, whose μP LR is width-independent; elsewhere the
rotated gradient's entries are spread as Adam sees them, and Adam's μP LR is m⁻¹. On whole matrices the mix of the
two drifts with width, and no single exponent holds (bench/RESULTS.md).

With a block b (`train.precondition_block`) each weight is cut into b × b tiles, each tile its own L, R, bases and V
— block-diagonal preconditioning, as Distributed Shampoo runs at scale, and what makes Adam's μP width rule exact
for SOAP: a tile's statistics do not depend on the width, so, as for Adam (SOAP with 1 × 1 tiles), each output
coordinate's change adds up n/b tiles that move together and the LR takes m⁻¹ (parametrization docstring).

M stays in the parameter's own coordinates and is rotated when used; V stays in the rotated ones and is kept when
the basis is refreshed (eigenvalues sorted ascending each time, so a coordinate keeps its place in the spectrum), as
the authors' implementation keeps it. Eigenbases come from a full (batched) eigendecomposition rather than the
authors' one power-iteration step with QR: the factors here are at most a few thousand wide, and the refresh is
every 10 steps.
"""

from __future__ import annotations

import torch

from rung.jobs.train.kronecker import KroneckerFactored, eigh


class SOAP(KroneckerFactored):
    """SOAP over groups of 2-D parameters; each group has "lr", "weight_decay" and "eps". `block`: the tile side
    (None: whole matrices); it must divide both sides of every parameter."""

    STATE = (*KroneckerFactored.STATE, "left_basis", "right_basis", "second_moment")
    GROUP_KEY = "eps"

    def __init__(self, groups: list[dict], betas: tuple[float, float], precondition_every: int,
                 block: int | None = None):
        super().__init__(groups, betas, precondition_every)
        self.block = block
        for param in (p for group in self.param_groups for p in group["params"]):
            if block is not None and (block < 1 or any(side % block for side in param.shape)):
                raise ValueError(f"SOAP's block {block} does not divide a {tuple(param.shape)} parameter's sides")

    def _tile_sides(self, out: int, into: int) -> tuple[int, int]:
        return (out, into) if self.block is None else (self.block, self.block)

    def state_shapes(self, out: int, into: int) -> dict[str, tuple[int, ...]]:
        rows, cols = self._tile_sides(out, into)
        grid = (out // rows, into // cols)
        left, right = (*grid, rows, rows), (*grid, cols, cols)  # per tile: a factor and its eigenbasis on each side
        return {"momentum": (out, into), "left": left, "right": right, "left_basis": left, "right_basis": right,
                "second_moment": (*grid, rows, cols)}

    def _tiles(self, matrix: torch.Tensor) -> torch.Tensor:
        """[out, into] as its grid of tiles, [out/rows, into/cols, rows, cols]."""
        rows, cols = self._tile_sides(*matrix.shape)
        return matrix.unflatten(0, (-1, rows)).unflatten(2, (-1, cols)).transpose(1, 2)

    @staticmethod
    def _untiled(tiles: torch.Tensor) -> torch.Tensor:
        return tiles.transpose(1, 2).flatten(2, 3).flatten(0, 1)

    def update_factors(self, state: dict, grad: torch.Tensor, beta2: float, slot: tuple[int, int]) -> None:
        tiles = self._tiles(grad)
        state["left"].mul_(beta2).add_(tiles @ tiles.mT, alpha=1 - beta2)
        state["right"].mul_(beta2).add_(tiles.mT @ tiles, alpha=1 - beta2)

    def refresh(self, state: dict, group: dict, step: int) -> None:
        for side in ("left", "right"):  # eigenvectors do not depend on the bias correction's scale
            state[f"{side}_basis"].copy_(eigh(state[side])[1].to(state[side].dtype))

    def advance(self, state: dict, group: dict, grad: torch.Tensor, step: int,
                slot: tuple[int, int]) -> torch.Tensor | None:
        """The paper's order (module docstring): the update in the basis of earlier gradients, then the factors and
        the basis; the first step builds the basis only."""
        update = None
        if step > 1:
            beta1 = group["betas"][0]
            state["momentum"].mul_(beta1).add_(grad, alpha=1 - beta1)
            update = self.direction(state, group, grad, step)
        self.update_factors(state, grad, group["betas"][1], slot)
        if self.refresh_due(state, step, group["precondition_every"]):
            self.refresh(state, group, step)
        return update

    def direction(self, state: dict, group: dict, grad: torch.Tensor, step: int) -> torch.Tensor:
        beta1, beta2 = group["betas"]
        adam_steps = step - 1  # the first step built the basis only
        left, right = state["left_basis"], state["right_basis"]
        rotated = left.mT @ self._tiles(grad) @ right
        state["second_moment"].mul_(beta2).addcmul_(rotated, rotated, value=1 - beta2)
        momentum = left.mT @ self._tiles(state["momentum"]) @ right / (1 - beta1 ** adam_steps)
        scale = (state["second_moment"] / (1 - beta2 ** adam_steps)).sqrt_().add_(group["eps"])
        return self._untiled(left @ (momentum / scale) @ right.mT)
