"""rung's Shampoo, SOAP and K-FAC against their updates written out by hand, their no-op for DeepSpeed's
zero-gradient construction step, and their state as the named tensors a pickle-free checkpoint holds."""

from __future__ import annotations

import pytest
import torch

from rung.jobs.train.kfac import KFAC
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


def test_soap_steps_equal_adam_in_the_eigenbasis_of_earlier_gradients_written_out():
    """The paper's order: step t's gradient rotated into the eigenvectors of the factors through step t − 1 (torch's
    eigh, refreshed after steps 1 and 3), Adam's moments of it with bias corrections counting from step 2, the
    second moment kept across a refresh, the momentum rotated when used; the first step changes nothing but the
    factors and the basis. Square, so that both factors have full rank from the first step: in a null space the basis
    is arbitrary."""
    torch.manual_seed(1)
    weight = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = SOAP([{"params": [weight], "lr": LR, "weight_decay": WD, "eps": EPS}], BETAS, precondition_every=2)
    expected, second = weight.detach().double().clone(), torch.zeros(4, 4).double()
    momentum = torch.zeros(4, 4).double()
    q_left = q_right = torch.eye(4).double()  # replaced after step 1, before their first use
    for step, g, left, right, _ in stepped_by_hand(optimizer, weight, 4):
        if step > 1:
            adam_steps = step - 1
            momentum = BETAS[0] * momentum + (1 - BETAS[0]) * g
            rotated = q_left.T @ g @ q_right
            second = BETAS[1] * second + (1 - BETAS[1]) * rotated ** 2
            adam = q_left.T @ momentum @ q_right / (1 - BETAS[0] ** adam_steps)
            adam = adam / ((second / (1 - BETAS[1] ** adam_steps)).sqrt() + EPS)
            expected = expected * (1 - LR * WD) - LR * (q_left @ adam @ q_right.T)
        if step in (1, 3):
            q_left, q_right = torch.linalg.eigh(left)[1], torch.linalg.eigh(right)[1]
        assert torch.allclose(weight.detach().double(), expected, rtol=1e-4, atol=1e-5), step
    assert set(optimizer.state[weight]) == {"step", *SOAP.STATE}
    assert {key: tuple(optimizer.state[weight][key].shape) for key in SOAP.STATE} == {
        "momentum": (4, 4), **{key: (1, 1, 4, 4) for key in SOAP.STATE if key != "momentum"}}  # one tile


def test_blocked_soap_steps_each_tile_as_a_soap_of_its_own():
    """With a block b every b × b tile of the weight has its own factors, bases and second moment: the blocked step
    equals unblocked SOAP run on each tile with that tile of the gradient."""
    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(4, 6))
    before = weight.detach().clone()
    tiles = [[torch.nn.Parameter(weight.detach()[r:r + 2, c:c + 2].clone()) for c in (0, 2, 4)] for r in (0, 2)]
    group = {"lr": LR, "weight_decay": WD, "eps": EPS}
    blocked = SOAP([{"params": [weight], **group}], BETAS, precondition_every=2, block=2)
    each = SOAP([{"params": [t for row in tiles for t in row], **group}], BETAS, precondition_every=2)
    for _ in range(4):
        grad = torch.randn(4, 6)
        weight.grad = grad.clone()
        for r, row in enumerate(tiles):
            for c, tile in enumerate(row):
                tile.grad = grad[2 * r:2 * r + 2, 2 * c:2 * c + 2].clone()
        blocked.step()
        each.step()
        assert torch.allclose(weight.detach(), torch.cat([torch.cat(list(row), 1) for row in tiles]).detach(),
                              rtol=1e-5, atol=1e-6)
    assert not torch.allclose(weight.detach(), before, atol=1e-2)  # three updates (the first step builds the bases)
    assert tuple(blocked.state[weight]["left"].shape) == (2, 3, 2, 2)
    with pytest.raises(ValueError, match="block 4 does not divide"):
        SOAP([{"params": [weight], **group}], BETAS, precondition_every=2, block=4)


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


def kfac_model(readout: float = 1.0) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6, bias=False), torch.nn.Tanh(), torch.nn.Linear(6, 3, bias=False))
    with torch.no_grad():
        model[2].weight.mul_(readout)
    return model, [model[0].weight, model[2].weight]


def kfac_for(model, weights, every: int = 2, damping: float = DAMPING):
    return KFAC([{"params": weights, "lr": LR, "weight_decay": WD, "damping": damping}], model.modules(), BETAS,
                precondition_every=every, loss_tokens=TOKENS)


TOKENS = 10  # a batch of 5 sequences of 2 tokens, the loss their mean


def loss_of(model, inputs: torch.Tensor) -> torch.Tensor:
    return (model(inputs) - 1).pow(2).sum(-1).mean()  # a zero readout still gets a gradient


def test_kfac_steps_equal_the_natural_gradient_written_out():
    """Each layer's factors from its inputs a and its per-token output gradients ĝ (autograd's, × the tokens the loss
    averages), EMAs with β₂; damping ρ split by π between the two sides; inverses by torch.linalg.inv, refreshed on
    steps 1 and 3; the direction G⁻¹·M·A⁻¹ with M the gradient's momentum."""
    model, weights = kfac_model()
    optimizer = kfac_for(model, weights)
    expected = [w.detach().double().clone() for w in weights]
    factors = [[torch.zeros(6, 6).double(), torch.zeros(4, 4).double()],
               [torch.zeros(3, 3).double(), torch.zeros(6, 6).double()]]
    momenta = [torch.zeros_like(e) for e in expected]
    inverses: list = [None, None]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(_layer, inputs, output):  # each layer's input, and its output with the gradient autograd gives it
        output.retain_grad()
        seen.append((inputs[0], output))

    for layer in (model[0], model[2]):
        layer.register_forward_hook(keep)
    for step in range(1, 5):
        seen.clear()
        optimizer.zero_grad()
        loss_of(model, torch.randn(5, 2, 4)).backward()
        optimizer.step()
        for i, (a, out) in enumerate(seen):
            a, g = a.detach().reshape(-1, a.shape[-1]).double(), out.grad.reshape(-1, out.shape[-1]).double() * TOKENS
            left, right = factors[i]
            factors[i] = [BETAS[1] * left + (1 - BETAS[1]) * g.T @ g / len(g),
                          BETAS[1] * right + (1 - BETAS[1]) * a.T @ a / len(a)]
            grad = g.T @ a / TOKENS
            momenta[i] = BETAS[0] * momenta[i] + (1 - BETAS[0]) * grad
            if step in (1, 3):
                gg, aa = (f / (1 - BETAS[1] ** step) for f in factors[i])
                pi = ((aa.trace() / len(aa)) / (gg.trace() / len(gg))).sqrt()
                inverses[i] = (torch.linalg.inv(gg + DAMPING ** 0.5 / pi * torch.eye(len(gg))),
                               torch.linalg.inv(aa + DAMPING ** 0.5 * pi * torch.eye(len(aa))))
            update = inverses[i][0] @ momenta[i] @ inverses[i][1] / (1 - BETAS[0] ** step)
            expected[i] = expected[i] * (1 - LR * WD) - LR * update
            assert torch.allclose(weights[i].detach().double(), expected[i], rtol=1e-4, atol=1e-5), (step, i)
    state = optimizer.state[weights[0]]
    assert set(state) == {"step", *KFAC.STATE} and all(isinstance(v, torch.Tensor) for v in state.values())
    assert {key: tuple(state[key].shape) for key in KFAC.STATE} == {
        "momentum": (6, 4), "left": (6, 6), "right": (4, 4), "left_inverse": (6, 6), "right_inverse": (4, 4), "pi": ()}


def test_kfacs_damping_split_lives_on_the_host_and_its_matrices_by_the_weight():
    """π is read by the host every step (whether the preconditioner is due): on a GPU, a π kept by the weight would
    be one device synchronisation per layer per step. (A meta-device weight stands in for a GPU's here.)"""
    model, weights = kfac_model()
    state = kfac_for(model, weights).initial_state(torch.nn.Parameter(torch.empty(6, 4, device="meta")))
    assert state["pi"].device.type == "cpu" and state["step"].device.type == "cpu"
    assert {state[key].device.type for key in KFAC.STATE if key != "pi"} == {"meta"}


def test_kfac_counts_a_recomputed_layer_once_and_an_evaluation_pass_not_at_all():
    """Activation checkpointing runs the layer's forward again in backward; torch.no_grad passes have no backward."""
    inputs = torch.randn(5, 2, 4)
    sums = []
    for recompute in (False, True):
        model, weights = kfac_model()
        optimizer = kfac_for(model, weights)
        with torch.no_grad():
            loss_of(model, torch.randn(5, 2, 4))
        output = (torch.utils.checkpoint.checkpoint(model, inputs, use_reentrant=False) if recompute
                  else model(inputs))
        (output - 1).pow(2).sum(-1).mean().backward()
        recorder = optimizer.recorders[(0, 0)]
        sums.append((recorder.tokens, recorder.inputs.clone(), recorder.grads.clone()))
    assert sums[0][0] == sums[1][0] == TOKENS
    assert torch.allclose(sums[0][1], sums[1][1]) and torch.allclose(sums[0][2], sums[1][2])


def test_kfac_waits_for_both_factors_before_its_first_preconditioner():
    """A zero readout sends no gradient back on the first step: the hidden layer's G is empty, its update zero, and
    its preconditioner is derived again on the next step rather than kept for precondition_every steps."""
    model, weights = kfac_model(readout=0.0)
    optimizer = kfac_for(model, weights, every=10)
    before = weights[0].detach().clone()
    for step in (1, 2):
        optimizer.zero_grad()
        loss_of(model, torch.randn(5, 2, 4)).backward()
        optimizer.step()
        state = optimizer.state[weights[0]]
        if step == 1:
            assert float(state["pi"]) == 0 and torch.equal(weights[0].detach(), before * (1 - LR * WD))
    assert float(state["pi"]) > 0 and state["left_inverse"].abs().sum() > 0
    assert not torch.allclose(weights[0].detach(), before * (1 - LR * WD) ** 2)


@pytest.mark.parametrize("layer, needle", [(torch.nn.Linear(3, 2), "bias-free"), (None, "bias-free")])
def test_kfac_steps_the_weights_of_linear_layers_only(layer, needle):
    model = torch.nn.Sequential(layer or torch.nn.Linear(3, 2, bias=False))
    weight = model[0].weight if layer is not None else torch.nn.Parameter(torch.randn(2, 3))
    with pytest.raises(ValueError, match=needle):
        KFAC([{"params": [weight], "lr": LR, "weight_decay": 0.0, "damping": 1e-3}], model.modules(), BETAS, 10, 1)
