"""The training optimizers behind `train.optimizer`, built from the parametrization's groups (each group says which
optimizer steps it): `adamw`, torch's AdamW (fused on GPUs); `muon`, torch's Muon for the hidden matrices — Newton–
Schulz-orthogonalized Nesterov momentum (in fp32 on CPUs without bf16: `muon.py`), its LR adjusted to AdamW's update
RMS (`match_rms_adamw`), so one base LR serves both; `shampoo`, `soap` and `kfac`, rung's `Shampoo`, `SOAP` and
`KFAC` (`shampoo.py`, `soap.py`, `kfac.py`) for the hidden matrices. These step matrices, so every other group
(embedding, norms, readout, router) takes AdamW beside them. The pair is one `torch.optim.Optimizer` to DeepSpeed and
the LR schedule: it shares its group dicts with the two it steps, so a schedule (or DeepSpeed's fp32 master copies)
changing a group changes it for the optimizer that owns it.

Muon, Shampoo, SOAP and K-FAC precondition whole matrices, so they run under ZeRO-0 only (ZeRO 1-3 hand the
optimizer flat partitions); `check_launchable` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch

from rung.jobs.config import TrainConfig
from rung.jobs.train.kfac import KFAC
from rung.jobs.train.kronecker import KroneckerFactored
from rung.jobs.train.muon import Muon
from rung.jobs.train.shampoo import Shampoo
from rung.jobs.train.soap import SOAP

MUON_MOMENTUM = 0.95  # train.muon_momentum's default: the value Muon's authors and torch use
DAMPING = {"shampoo": 1e-3, "kfac": 1e-2}  # train.damping's defaults (shampoo.py says why Shampoo's is this large)
PRECONDITION_EVERY = 10  # train.precondition_every's default
MATRIX_OPTIMIZERS = ("muon", "shampoo", "soap", "kfac")  # step whole matrices: ZeRO-0 only
ADAMW_STATE = ("exp_avg", "exp_avg_sq")
MUON_STATE = ("momentum_buffer",)


class _States(MutableMapping):
    """The two optimizers' per-parameter state as one mapping, each parameter's in the optimizer that steps it."""

    def __init__(self, owner: MatrixWithAdamW):
        self.owner = owner

    def _of(self, param: torch.Tensor) -> dict:
        return self.owner.optimizer_of(param).state

    def __getitem__(self, param: torch.Tensor) -> dict:
        return self._of(param)[param]

    def __setitem__(self, param: torch.Tensor, value: dict) -> None:
        self._of(param)[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._of(param)[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self.owner.matrix.state
        yield from self.owner.adamw.state

    def __len__(self) -> int:
        return len(self.owner.matrix.state) + len(self.owner.adamw.state)


class MatrixWithAdamW(torch.optim.Optimizer):
    """A matrix optimizer (Muon, Shampoo, SOAP, K-FAC) for the groups marked with its name, AdamW for the others,
    stepped together."""

    def __init__(self, matrix: torch.optim.Optimizer, adamw: torch.optim.AdamW):
        self.matrix, self.adamw = matrix, adamw
        super().__init__(matrix.param_groups + adamw.param_groups, {})
        self.param_groups = matrix.param_groups + adamw.param_groups  # the very dicts the two step
        self.state = _States(self)

    def optimizer_of(self, param: torch.Tensor) -> torch.optim.Optimizer:
        matrix = any(p is param for group in self.matrix.param_groups for p in group["params"])
        return self.matrix if matrix else self.adamw

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.matrix.step()
        self.adamw.step()
        return loss


def damping(train: TrainConfig) -> float:
    """Shampoo's or K-FAC's base damping (train.damping, or the optimizer's default); 0 for the others."""
    return train.damping or DAMPING.get(train.optimizer, 0.0)


def build_optimizer(train: TrainConfig, groups: list[dict], model: torch.nn.Module,
                    loss_tokens: int) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names over the parametrization's `groups` of `model`'s parameters, whose
    gradient one backward takes of a loss averaged over `loss_tokens` tokens (K-FAC's per-token statistics)."""
    fused = torch.cuda.is_available()  # one kernel per step for every parameter, not a launch per tensor and op
    adamw = torch.optim.AdamW([group for group in groups if group["optimizer"] == "adamw"], betas=train.betas,
                              fused=fused)
    matrix = [group for group in groups if group["optimizer"] == train.optimizer != "adamw"]
    if train.optimizer == "muon":
        return MatrixWithAdamW(Muon(matrix, momentum=train.muon_momentum or MUON_MOMENTUM,
                                    nesterov=True, adjust_lr_fn="match_rms_adamw"), adamw)
    every = train.precondition_every or PRECONDITION_EVERY
    if train.optimizer == "shampoo":
        return MatrixWithAdamW(Shampoo(matrix, betas=train.betas, precondition_every=every), adamw)
    if train.optimizer == "soap":
        return MatrixWithAdamW(SOAP(matrix, betas=train.betas, precondition_every=every,
                                    block=train.precondition_block), adamw)
    if train.optimizer == "kfac":
        return MatrixWithAdamW(KFAC(matrix, model.modules(), betas=train.betas, precondition_every=every,
                                    loss_tokens=loss_tokens), adamw)
    return adamw


def state_keys(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[str, ...]:
    """The per-parameter state tensors a checkpoint holds for `param` under `optimizer`."""
    if isinstance(optimizer, MatrixWithAdamW) and optimizer.optimizer_of(param) is optimizer.matrix:
        return optimizer.matrix.STATE if isinstance(optimizer.matrix, KroneckerFactored) else MUON_STATE
    return ADAMW_STATE


def initial_state(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """`param`'s state before its first step (all zeros, each tensor its own shape), counter included: on the
    parameter's device under torch's fused AdamW (which steps it there), else on the host, as torch makes it."""
    owner = optimizer.optimizer_of(param) if isinstance(optimizer, MatrixWithAdamW) else optimizer
    if isinstance(owner, KroneckerFactored):
        return owner.initial_state(param)
    fused = any(group.get("fused") for group in owner.param_groups)
    return {"step": torch.tensor(0.0, device=param.device if fused else "cpu"),
            **{key: torch.zeros_like(param, memory_format=torch.preserve_format)
               for key in state_keys(optimizer, param)}}
