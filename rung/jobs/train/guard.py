"""The divergence guard: a non-finite loss or gradient norm stops training before the optimizer step applies it.

Checked every step, in this order: the loss of each micro-batch before its backward; the global gradient norm at
the accumulation boundary, before the update. Under ZeRO-0 fp32 the gradients are plain `.grad` tensors and DeepSpeed
reports no norm, so the guard computes it here (experts summed over their expert-parallel group), refuses a
non-finite one and clips with it. DeepSpeed's own optimizers (ZeRO 1-3, bf16) compute the norm inside their step and
skip a non-finite update themselves (reporting inf), so there the guard checks the norm they report. Either way the
step's grad norm is a number in the metrics, never NaN for "not computed".
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from rung.errors import RungError
from rung.jobs.config import TrainConfig


class TrainingDiverged(RungError):
    """The loss or gradient became non-finite (the optimizer step was not taken), or the loss passed its limit."""


def gradient_norm(model: torch.nn.Module) -> torch.Tensor:
    """Global L2 norm of the `.grad` tensors: shared parameters' gradients are the same on every rank after the
    all-reduce; an expert's live only on its ranks, so their squares are summed over the expert-parallel group."""
    shared, experts = [], []
    for param in model.parameters():
        if param.grad is not None:
            (experts if getattr(param, "allreduce", True) is False else shared).append(param.grad.detach())

    def squares(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return torch.zeros((), dtype=torch.float32)
        return torch.stack(torch._foreach_norm(grads)).float().pow(2).sum().cpu()

    total, expert = squares(shared), squares(experts)
    placement = getattr(model, "expert_placement", None)
    if experts and placement is not None and placement.ep_size > 1:
        dist.all_reduce(expert, group=placement.group)
    return (total + expert).sqrt()


class DivergenceGuard:
    def __init__(self, cfg: TrainConfig, computes_norm: bool):
        """`computes_norm`: the guard computes the norm and clips (ZeRO-0 fp32); else it reads DeepSpeed's."""
        self.cfg, self.computes_norm = cfg, computes_norm

    def check_loss(self, loss: torch.Tensor, step: int) -> None:
        """Before backward: a non-finite loss never reaches the gradients. `step` is 0-based."""
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"non-finite loss at step {step + 1}: {loss.item()}; the optimizer step was not "
                                   "taken")

    def before_update(self, engine, step: int) -> float | None:
        """At the accumulation boundary, before `engine.step()`: the gradient norm, checked and (ZeRO-0 fp32) used
        to clip; None where DeepSpeed's optimizer computes it inside its step."""
        if not self.computes_norm:
            return None
        norm = gradient_norm(engine.module)
        self._check(float(norm), step)
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_([p for p in engine.module.parameters() if p.grad is not None],
                                                 self.cfg.grad_clip, norm)
        return float(norm)

    def after_update(self, engine, step: int, norm: float | None) -> float:
        """The step's gradient norm: the guard's own, or the one DeepSpeed's optimizer computed (and skipped the
        update for, when it was not finite)."""
        if norm is None:
            reported = engine.get_global_grad_norm()
            if reported is None:  # DeepSpeed computes one for every engine the guard leaves the norm to
                raise RuntimeError("DeepSpeed reported no gradient norm for a ZeRO-1-3 or bf16 engine")
            norm = float(reported)
            self._check(norm, step)
        return norm

    def check_loss_limit(self, step: int, loss: float) -> None:
        """After the step (1-based here): stop a run whose loss passed `train.max_loss` after warmup."""
        limit = self.cfg.max_loss
        if limit is not None and step > self.cfg.warmup_steps and loss > limit:
            raise TrainingDiverged(f"loss {loss:.3f} above train.max_loss ({limit:g}) at step {step}")

    @staticmethod
    def _check(norm: float, step: int) -> None:
        if not math.isfinite(norm):
            raise TrainingDiverged(f"non-finite gradient norm ({norm}) at step {step + 1}; the optimizer step was "
                                   "not taken")
