"""rung's Shampoo and SOAP against their updates written out by hand, their no-op for DeepSpeed's zero-gradient
construction step, and their state as the named tensors a pickle-free checkpoint holds."""

from __future__ import annotations

import pytest
import torch

from rung.jobs.train.shampoo import Shampoo
from rung.jobs.train.soap import SOAP

BETAS, DAMPING, EPS, LR, WD = (0.9, 0.95), 1e-3, 1e-3, 0.05, 0.1


def inverse_fourth_root(matrix: torch.Tensor) -> torch.Tensor:
    """By SVD (a symmetric positive definite matrix's singular vectors are its eigenvectors): not the code's eigh."""
    u, s, _ = torch.linalg.svd(matrix.double())
    return (u * s ** -0.25) @ u.T


def stepped_by_hand(optimizer, weight: torch.nn.Parameter, steps: int):
    """Give `optimizer` `steps` random gradients; yield each step's number, float64 gradient and the factors and
    momentum as written out (L, R: EMAs of GGᵀ and GᵀG with β₂; M: EMA of G with β₁)."""
    out, into = weight.shape
    left, right = torch.zeros(out, out).double(), torch.zeros(into, into).double()
    momentum = torch.zeros(out, into).double()
    for step in range(1, steps + 1):
        grad = torch.randn(out, into)
        weight.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        left, right = BETAS[1] * left + (1 - BETAS[1]) * g @ g.T, BETAS[1] * right + (1 - BETAS[1]) * g.T @ g
        momentum = BETAS[0] * momentum + (1 - BETAS[0]) * g
        yield step, g, left, right, momentum


def test_steps_equal_the_update_written_out_with_roots_refreshed_every_other_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = Shampoo([{"params": [weight], "lr": LR, "weight_decay": WD, "damping": DAMPING}], BETAS,
                        precondition_every=2)
    expected = weight.detach().double().clone()
    for step, _, left, right, momentum in stepped_by_hand(optimizer, weight, 4):
        if step in (1, 3):  # the first step, then every other one
            correction = 1 - BETAS[1] ** step
            roots = (inverse_fourth_root(left / correction + DAMPING * torch.eye(6)),
                     inverse_fourth_root(right / correction + DAMPING * torch.eye(4)))
        update = roots[0] @ momentum @ roots[1] / (1 - BETAS[0] ** step)
        expected = expected * (1 - LR * WD) - LR * update
        assert torch.allclose(weight.detach().double(), expected, rtol=1e-4, atol=1e-5), step
    state = optimizer.state[weight]
    assert set(state) == {"step", *Shampoo.STATE} and all(isinstance(v, torch.Tensor) for v in state.values())
    assert {key: tuple(state[key].shape) for key in Shampoo.STATE} == {
        "momentum": (6, 4), "left": (6, 6), "right": (4, 4), "left_root": (6, 6), "right_root": (4, 4)}
    assert float(state["step"]) == 4


def test_soap_steps_equal_adam_in_the_factors_eigenbasis_written_out():
    """Adam's moments of the gradient rotated into the factors' eigenvectors (torch's eigh, refreshed on steps 1 and
    3), the second moment kept across a refresh, the momentum rotated when used. Square, so that both factors have
    full rank from the first step: in a null space the basis is arbitrary, and Adam's normalization would make
    either side's round-off a different direction of size ~1. ε is large for the same reason: the first rotated
    gradient is diagonal (G's singular vectors), its off-diagonal entries round-off that Adam divides by √v + ε."""
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = SOAP([{"params": [weight], "lr": LR, "weight_decay": WD, "eps": EPS}], BETAS, precondition_every=2)
    expected, second = weight.detach().double().clone(), torch.zeros(4, 4).double()
    for step, g, left, right, momentum in stepped_by_hand(optimizer, weight, 4):
        if step in (1, 3):
            q_left, q_right = torch.linalg.eigh(left)[1], torch.linalg.eigh(right)[1]
        rotated = q_left.T @ g @ q_right
        second = BETAS[1] * second + (1 - BETAS[1]) * rotated ** 2
        adam = q_left.T @ momentum @ q_right / (1 - BETAS[0] ** step)
        adam = adam / ((second / (1 - BETAS[1] ** step)).sqrt() + EPS)
        expected = expected * (1 - LR * WD) - LR * (q_left @ adam @ q_right.T)
        assert torch.allclose(weight.detach().double(), expected, rtol=1e-4, atol=1e-5), step
    assert set(optimizer.state[weight]) == {"step", *SOAP.STATE}
    assert {key: tuple(optimizer.state[weight][key].shape) for key in SOAP.STATE} == {key: (4, 4) for key in SOAP.STATE}


@pytest.mark.parametrize("kind, key", [(Shampoo, "damping"), (SOAP, "eps")])
def test_a_first_step_of_zero_gradients_is_no_step(kind, key):
    """DeepSpeed's unfused bf16 optimizer steps once with zero gradients at construction: a preconditioner derived
    then, from empty factors, would be wrong until the next refresh (Shampoo's roots would scale by damping^(−½))."""
    weight = torch.nn.Parameter(torch.randn(3, 5))
    before = weight.detach().clone()
    optimizer = kind([{"params": [weight], "lr": LR, "weight_decay": WD, key: 1e-3}], BETAS, 10)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    assert torch.equal(weight.detach(), before) and not optimizer.state[weight]
    weight.grad = torch.randn(3, 5)
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 1 and optimizer.state[weight]["left"].abs().sum() > 0


@pytest.mark.parametrize("kind, group, needle", [(Shampoo, {"damping": 0.0}, "damping"), (SOAP, {"eps": -1.0}, "eps"),
                                                 (Shampoo, {"damping": 1e-3, "shape": (4,)}, "2-D")])
def test_bad_groups_are_refused(kind, group, needle):
    param = torch.nn.Parameter(torch.randn(*group.pop("shape", (2, 2))))
    with pytest.raises(ValueError, match=needle):
        kind([{"params": [param], "lr": LR, "weight_decay": 0.0, **group}], BETAS, 10)
