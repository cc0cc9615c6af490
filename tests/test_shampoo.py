"""rung's Shampoo against the update written out by hand, its no-op for DeepSpeed's zero-gradient construction step,
and its state as the named tensors a pickle-free checkpoint holds."""

from __future__ import annotations

import pytest
import torch

from rung.jobs.train.shampoo import SHAMPOO_STATE, Shampoo

BETAS, DAMPING, LR, WD = (0.9, 0.95), 1e-3, 0.05, 0.1


def inverse_fourth_root(matrix: torch.Tensor) -> torch.Tensor:
    """By SVD (a symmetric positive definite matrix's singular vectors are its eigenvectors): not the code's eigh."""
    u, s, _ = torch.linalg.svd(matrix.double())
    return (u * s ** -0.25) @ u.T


def test_steps_equal_the_update_written_out_with_roots_refreshed_every_other_step():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 4))
    optimizer = Shampoo([{"params": [weight], "lr": LR, "weight_decay": WD, "damping": DAMPING}], BETAS,
                        precondition_every=2)
    expected = weight.detach().double().clone()
    left, right, momentum = torch.zeros(6, 6).double(), torch.zeros(4, 4).double(), torch.zeros(6, 4).double()
    for step in range(1, 5):
        grad = torch.randn(6, 4)
        weight.grad = grad.clone()
        optimizer.step()
        g = grad.double()
        left, right = BETAS[1] * left + (1 - BETAS[1]) * g @ g.T, BETAS[1] * right + (1 - BETAS[1]) * g.T @ g
        momentum = BETAS[0] * momentum + (1 - BETAS[0]) * g
        if step in (1, 3):  # the first step, then every other one
            correction = 1 - BETAS[1] ** step
            roots = (inverse_fourth_root(left / correction + DAMPING * torch.eye(6)),
                     inverse_fourth_root(right / correction + DAMPING * torch.eye(4)))
        update = roots[0] @ momentum @ roots[1] / (1 - BETAS[0] ** step)
        expected = expected * (1 - LR * WD) - LR * update
        assert torch.allclose(weight.detach().double(), expected, rtol=1e-4, atol=1e-5), step
    state = optimizer.state[weight]
    assert set(state) == {"step", *SHAMPOO_STATE} and all(isinstance(v, torch.Tensor) for v in state.values())
    assert {key: tuple(state[key].shape) for key in SHAMPOO_STATE} == {
        "momentum": (6, 4), "left": (6, 6), "right": (4, 4), "left_root": (6, 6), "right_root": (4, 4)}
    assert float(state["step"]) == 4


def test_a_first_step_of_zero_gradients_is_no_step():
    """DeepSpeed's unfused bf16 optimizer steps once with zero gradients at construction: roots computed then, from
    empty factors, would scale the next steps by damping^(−½)."""
    weight = torch.nn.Parameter(torch.randn(3, 5))
    before = weight.detach().clone()
    optimizer = Shampoo([{"params": [weight], "lr": LR, "weight_decay": WD, "damping": DAMPING}], BETAS, 10)
    weight.grad = torch.zeros_like(weight)
    optimizer.step()
    assert torch.equal(weight.detach(), before) and not optimizer.state[weight]
    weight.grad = torch.randn(3, 5)
    optimizer.step()
    assert float(optimizer.state[weight]["step"]) == 1 and optimizer.state[weight]["left_root"].abs().sum() > 0


@pytest.mark.parametrize("group, needle", [({"damping": 0.0}, "damping"), ({"damping": 1e-3, "shape": (4,)}, "2-D")])
def test_bad_groups_are_refused(group, needle):
    param = torch.nn.Parameter(torch.randn(*group.pop("shape", (2, 2))))
    with pytest.raises(ValueError, match=needle):
        Shampoo([{"params": [param], "lr": LR, "weight_decay": 0.0, **group}], BETAS, 10)
