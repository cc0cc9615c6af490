"""The training optimizers behind `train.optimizer`, built from the parametrization's groups (each group says which
optimizer steps it): `adamw`, torch's AdamW (fused on GPUs); `muon`, torch's Muon for the hidden matrices — Newton–
Schulz-orthogonalized Nesterov momentum, its LR adjusted to AdamW's update RMS (`match_rms_adamw`), so one base LR
serves both — with AdamW for every other group. The pair is one `torch.optim.Optimizer` to DeepSpeed and the LR
schedule: it shares its group dicts with the two it steps, so a schedule (or DeepSpeed's fp32 master copies)
changing a group changes it for the optimizer that owns it.

Muon orthogonalizes whole matrices, so it runs under ZeRO-0 only (ZeRO 1-3 hand the optimizer flat partitions);
`check_launchable` refuses the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping

import torch

from rung.jobs.config import TrainConfig

MUON_MOMENTUM = 0.95  # train.muon_momentum's default: the value Muon's authors and torch use
ADAMW_STATE = ("exp_avg", "exp_avg_sq")
MUON_STATE = ("momentum_buffer",)


class _States(MutableMapping):
    """The two optimizers' per-parameter state as one mapping, each parameter's in the optimizer that steps it."""

    def __init__(self, owner: MuonWithAdamW):
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
        yield from self.owner.muon.state
        yield from self.owner.adamw.state

    def __len__(self) -> int:
        return len(self.owner.muon.state) + len(self.owner.adamw.state)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the groups marked "optimizer": "muon", AdamW for the others, stepped together."""

    def __init__(self, groups: list[dict], betas: tuple[float, float], momentum: float, fused: bool):
        muon = [group for group in groups if group["optimizer"] == "muon"]
        self.muon = torch.optim.Muon(muon, momentum=momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW([group for group in groups if group["optimizer"] == "adamw"], betas=betas,
                                       fused=fused)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, {})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups  # the very dicts the two step
        self.state = _States(self)

    def optimizer_of(self, param: torch.Tensor) -> torch.optim.Optimizer:
        muon = any(p is param for group in self.muon.param_groups for p in group["params"])
        return self.muon if muon else self.adamw

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        self.muon.step()
        self.adamw.step()
        return loss


def build_optimizer(train: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names over the parametrization's `groups`."""
    fused = torch.cuda.is_available()  # one kernel per step for every parameter, not a launch per tensor and op
    if train.optimizer == "muon":
        return MuonWithAdamW(groups, train.betas, train.muon_momentum or MUON_MOMENTUM, fused)
    return torch.optim.AdamW(groups, betas=train.betas, fused=fused)


def state_keys(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[str, ...]:
    """The per-parameter state tensors a checkpoint holds for `param` under `optimizer`."""
    if isinstance(optimizer, MuonWithAdamW) and optimizer.optimizer_of(param) is optimizer.muon:
        return MUON_STATE
    return ADAMW_STATE
