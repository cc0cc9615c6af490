"""rung's Muon: torch's step wherever bf16 is native, and on a CPU that emulates bf16 the same update orthogonalized
in fp32 — closer to the exact iteration than torch's bf16 one, not merely different."""

from __future__ import annotations

import pytest
import torch

from rung.jobs.train import muon
from rung.jobs.train.muon import Muon, orthogonalize

SETTINGS = {"lr": 0.02, "weight_decay": 0.1, "momentum": 0.95, "nesterov": True, "adjust_lr_fn": "match_rms_adamw"}


def deltas(cls: type[torch.optim.Muon], weights: list[torch.Tensor], grads: list[list[torch.Tensor]]):
    """Each weight's change after one step per gradient in `grads` (a list of per-weight gradients per step)."""
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = cls(params, **SETTINGS)
    for step in grads:
        for param, grad in zip(params, step):
            param.grad = grad.clone()
        optimizer.step()
    return [p.detach() - w for p, w in zip(params, weights)]


@pytest.mark.parametrize("native", [True, False])
def test_muon_orthogonalizes_in_fp32_only_where_the_cpu_emulates_bf16(native, monkeypatch):
    """This CPU's answer is fixed, so it is set both ways; tall and wide matrices, two steps (momentum)."""
    monkeypatch.setattr(muon, "native_bf16", lambda: native)
    rng = torch.Generator().manual_seed(0)
    weights = [torch.randn(96, 32, generator=rng), torch.randn(32, 80, generator=rng)]
    grads = [[torch.randn(w.shape, generator=rng) for w in weights] for _ in range(2)]
    ours, torchs = deltas(Muon, weights, grads), deltas(torch.optim.Muon, weights, grads)
    if native:
        assert all(torch.equal(a, b) for a, b in zip(ours, torchs))
        return
    for index, weight in enumerate(weights):  # the update written out, orthogonalized in float64
        buffer, param = torch.zeros_like(weight, dtype=torch.float64), weight.double().clone()
        for step in grads:
            grad = step[index].double()
            buffer.lerp_(grad, 1 - SETTINGS["momentum"])
            update = orthogonalize(grad.lerp(buffer, SETTINGS["momentum"]), (3.4445, -4.7750, 2.0315), 5, 1e-7,
                                   torch.float64)
            param.mul_(1 - SETTINGS["lr"] * SETTINGS["weight_decay"])
            param.add_(update, alpha=-SETTINGS["lr"] * 0.2 * max(weight.shape) ** 0.5)
        expected = param - weight.double()
        ours_error = (ours[index].double() - expected).abs().max()
        torchs_error = (torchs[index].double() - expected).abs().max()
        assert ours_error < torchs_error / 100, (ours_error, torchs_error)
