"""rung's Muon: torch's (`torch.optim.Muon`: its defaults, checks, state and LR adjustment) with the Newton–Schulz
orthogonalization in the precision the hardware multiplies fastest.

torch orthogonalizes in bf16, which GPUs and CPUs with AVX-512 BF16 or AMX multiply natively. A CPU without them
emulates bf16: there one orthogonalization of a 1408 x 512 gradient took 4.2 s against 0.14 s in fp32 (30x, an
AVX2-only EPYC, one thread), which made Muon's coordinate check at width 512 take 11 minutes. On such a CPU rung
runs the same iteration in fp32 (no less exact); everywhere else the step is torch's own.
"""

from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr

from rung.platform.cpu_features import native_bf16


def orthogonalize(matrix: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """torch's quintic Newton–Schulz iteration (`torch.optim._muon`) towards the nearest semi-orthogonal matrix, in
    `dtype`: normalised to spectral norm at most 1, then X ← aX + (bA + cA²)X with A = XXᵀ on the wide side."""
    a, b, c = coefficients
    tall = matrix.size(0) > matrix.size(1)
    x = matrix.to(dtype)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Muon):
    """`torch.optim.Muon`, orthogonalizing in fp32 on a CPU that would emulate bf16."""

    @torch.no_grad()
    def step(self, closure=None):
        emulated = any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]) \
            and not native_bf16()
        if not emulated:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                update = orthogonalize(update, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                       torch.float32)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], param.shape))
        return loss
