"""The one owner of the width/depth scaling rules (SP, μP, Depth-μP, CompleteP).

Notation as in the reference tables: m = d_model / base_width, m_L = n_layers / base_depth, η/σ/λ/ε the base
LR, init std, weight decay and Adam epsilon tuned at the base shape. For each parameter role this module gives the
init std and the LR / weight-decay / epsilon multipliers; for the model it gives the forward multipliers. Training,
sweeps, coordinate checks and export all ask this module; nothing else encodes a scaling rule.

| role         | init std          | LR ×              | WD × | eps ×          | forward              |
|--------------|-------------------|-------------------|------|----------------|----------------------|
| embedding    | σ                 | 1                 | 1    | 1              | × embedding_mult     |
| hidden       | σ/√m              | m⁻¹·m_L^(α−1)     | m    | m⁻¹·m_L^(−α)   | branch × m_L^(−α)    |
| block norm   | 1                 | m_L^(α−1)         | 1    | 1              |                      |
| final norm   | 1                 | 1                 | 1    | 1              |                      |
| readout      | σ (or 0)          | 1                 | 1    | 1              | logits × α_out/m     |
| router       | σ (or 0)          | 1                 | 1    | 1              | logits × 1/m         |

With `train.optimizer=muon` the hidden matrices are stepped by Muon, whose update is an orthogonalized momentum:
every singular value ~1, scaled (torch's `adjust_lr_fn="match_rms_adamw"`) to AdamW's RMS, 0.2·√max(fan_out,
fan_in). Its spectral norm then grows as √m with width where μP's spectral condition (Yang, Simon & Bernstein, "A
Spectral Condition for Feature Learning") asks for Θ(√(fan_out/fan_in)) = Θ(1) on a hidden matrix; so its LR takes
m^(−½) rather than AdamW's m⁻¹, and its (decoupled) weight decay m^(½) so that LR × WD keeps AdamW's product. Depth
factors combine as for AdamW (a normalized update, like Adam's, scales with depth as Adam's does):

| role (Muon)  | init std          | LR ×              | WD × | eps ×          |
|--------------|-------------------|-------------------|------|----------------|
| hidden 2-D   | σ/√m              | m^(−½)·m_L^(α−1)  | m^½  | — (no ε)       |

With `train.optimizer=shampoo` the hidden matrices are stepped by Shampoo, L^(−¼)·G·R^(−¼) with damped Kronecker
factors L = E[GGᵀ], R = E[GᵀG]. Ishikawa & Karakida ("On the Parameterization of Second-Order Optimization
Effective Towards the Infinite Width", ICLR 2024, Table 1; the exponents as their code sets them: init variance
∝ fan_in⁻¹, hidden LR ∝ width⁰) give μP for Shampoo a width-independent hidden LR: for a gradient of low rank the
update's singular values are ~1 whatever the width, which is already what μP's spectral condition asks of a square
hidden matrix. Its damping ρ stays constant: under μP a hidden gradient's norm, hence each factor's leading
eigenvalue, is Θ(1) in width (the readout's 1/m makes the backpropagated signal O(1/√n) in norm against an O(√n)
input), so ρ keeps its place relative to them. (The paper's own damping rule was not checked against its table
here; the coordinate check and the sweep are the evidence.) Weight decay keeps LR × WD at AdamW's product; depth as
for AdamW:

| role (Shampoo) | init std        | LR ×              | WD × | damping × |
|----------------|-----------------|-------------------|------|-----------|
| hidden 2-D     | σ/√m            | m_L^(α−1)         | 1    | 1         |

With `train.optimizer=soap` the hidden matrices are stepped by SOAP — Adam in the eigenbasis of Shampoo's factors —
under AdamW's hidden row (LR m⁻¹·m_L^(α−1), WD m, ε m⁻¹·m_L^(−α)), which is exact for SOAP run in tiles of a fixed
side b (`train.precondition_block`, `soap.py`): a tile's statistics do not depend on the width, so each output
coordinate's change adds up n/b tiles that move together, as Adam's n entries do (Adam is SOAP with 1 × 1 tiles).
On whole matrices no single width exponent holds: where the basis already holds a gradient's directions the
rotated gradient is nearly diagonal and Adam's normalization makes the update Shampoo's spectral one (μP LR × 1),
elsewhere it is Adam's (× m⁻¹), and the mix drifts with width — the coordinate check (widths 32-512, tiny) gives
attention −0.15, FFN −0.33, residual −0.23 on whole matrices and −0.02 / −0.11 / −0.05 in tiles of 16
(bench/RESULTS.md). Qiu et al. ("Hyperparameter Transfer Enables Consistent Gains of Matrix-Preconditioned
Optimizers Across Scales", 2025) report the same finite-width drift and blocking among its cures. The tile must be
no wider than the base shape's matrices for the proxy to be tiled as the target is:

| role (SOAP)    | init std        | LR ×              | WD × | eps ×          |
|----------------|-----------------|-------------------|------|----------------|
| hidden 2-D     | σ/√m            | m⁻¹·m_L^(α−1)     | m    | m⁻¹·m_L^(−α)   |

With `train.optimizer=kfac` the hidden matrices are stepped by K-FAC, (G + ρ_G)⁻¹·∇W·(A + ρ_A)⁻¹ with A, G the
second moments of a layer's inputs and of its per-token output gradients (`kfac.py`). Ishikawa & Karakida's μP for
K-FAC keeps the hidden LR width-independent and rescales the damping with width. Undamped, the update is the
natural gradient, invariant to how the layer is scaled: for a hidden matrix under μP (inputs ~1 per entry, output
gradients ~1/n) it moves the layer's outputs by Θ(1), so η stays. Fully damped it is SGD with η/(ρ_A·ρ_G), whose μP
hidden LR is also width-independent (the SGD column of the paper's table), so the product ρ_A·ρ_G = ρ stays; and the
split between the two sides, which must follow A's eigenvalues up (∝ n) and G's down (∝ 1/n), is what Martens &
Grosse's factored damping π does by itself (`kfac.py`). So ρ takes × 1 in width — the paper states each side's
damping as a power of fan-in or fan-out; its exponents were not checked against its table here, and the coordinate
check is the evidence. Depth differs from the normalized optimizers: a branch multiplier m_L^(−α) scales the
output gradient G's side by m_L^(−α), and the natural gradient undoes it (update × m_L^(α)), so each branch moves
by η and the LR takes m_L^(−1) for the L branches to add up to Θ(1); G's eigenvalues scale by m_L^(−2α) and π by
m_L^(α), so ρ takes m_L^(−2α) to keep each side's damping in place; weight decay keeps LR × WD at AdamW's product:

| role (K-FAC)   | init std        | LR ×              | WD ×     | damping ×    |
|----------------|-----------------|-------------------|----------|--------------|
| hidden 2-D     | σ/√m            | m_L^(−1)          | m_L^(α)  | m_L^(−2α)    |

Every other role stays on AdamW with the rows above (as would a hidden tensor that is not a matrix: Muon, Shampoo,
SOAP and K-FAC take matrices, `matrix_steps`; rung's experts are one linear layer each).

Attention logits use attn_mult/d_head with attn_mult = √(base_head_dim), so the base shape equals SP's 1/√d_head.
SP sets m = m_L = 1 in every rule (and keeps 1/√d_head); `mup` applies the width rules only; `depth-mup` (α = ½)
and `completep` (α = 1) apply width and depth rules together. The reference does not say which groups take the
epsilon correction: it is applied to hidden matrices, whose gradients shrink with width; the final norm sits outside
every residual branch, so it keeps η.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from rung.jobs.config import ModelConfig, Optimizer, ParamConfig
from rung.jobs.params.roles import Role, role_of

_DEPTH_ALPHA = {"sp": None, "mup": None, "depth-mup": 0.5, "completep": 1.0}


@dataclass(frozen=True, slots=True)
class Multipliers:
    """Forward-pass constants the model multiplies by; SP at the base shape is all ones except 1/√d_head."""

    embedding: float  # on the embedding output
    attention: float  # on q·k
    residual: float  # on each residual branch
    output: float  # on the logits
    router: float  # on the router logits


@dataclass(frozen=True, slots=True)
class GroupRule:
    init_std: float | None  # None: norm gains, initialised to one
    lr_mult: float
    wd_mult: float
    eps_mult: float  # on AdamW's and SOAP's ε; on Shampoo's and K-FAC's damping for theirs; Muon has neither


class Parametrization:
    """The scaling rules for one model shape relative to one base shape."""

    def __init__(self, param: ParamConfig, model: ModelConfig):
        self.config = param
        self.name = param.name
        self.width_aware = param.scales_width
        self.alpha = _DEPTH_ALPHA[param.name]
        base_width, base_depth = param.base_shape(model)
        self.width_mult = model.d_model / base_width if self.width_aware else 1.0
        self.depth_mult = model.n_layers / base_depth if self.alpha is not None else 1.0
        self.head_dim = model.resolved_head_dim
        self.base_head_dim = param.base_head_dim or self.head_dim

    def _depth(self, exponent: float) -> float:
        return self.depth_mult ** exponent if self.alpha is not None else 1.0

    @property
    def multipliers(self) -> Multipliers:
        m = self.width_mult
        attention = (math.sqrt(self.base_head_dim) / self.head_dim if self.width_aware
                     else 1.0 / math.sqrt(self.head_dim))
        return Multipliers(
            embedding=self.config.embedding_mult,
            attention=attention,
            residual=self._depth(-self.alpha) if self.alpha is not None else 1.0,
            output=self.config.output_mult / m,
            router=1.0 / m,
        )

    def rule(self, role: Role, optimizer: Optimizer = "adamw") -> GroupRule:
        """Init std and optimizer multipliers for one parameter role under `optimizer` (the module docstring's
        tables); `muon`, `shampoo` and `kfac` differ from `adamw` for 2-D hidden matrices only (`matrix_steps`), and
        `soap` takes AdamW's rules."""
        sigma, m = self.config.init_std, self.width_mult
        alpha = self.alpha if self.alpha is not None else 0.0
        readout_std = 0.0 if self.config.zero_readout else sigma
        if optimizer == "muon" and role is Role.HIDDEN:
            return GroupRule(sigma / math.sqrt(m), self._depth(alpha - 1) / math.sqrt(m), math.sqrt(m), 1.0)
        if optimizer == "shampoo" and role is Role.HIDDEN:
            return GroupRule(sigma / math.sqrt(m), self._depth(alpha - 1), 1.0, 1.0)
        if optimizer == "kfac" and role is Role.HIDDEN:
            return GroupRule(sigma / math.sqrt(m), self._depth(-1), self._depth(alpha), self._depth(-2 * alpha))
        rules = {
            Role.EMBEDDING: GroupRule(sigma, 1.0, 1.0, 1.0),
            Role.HIDDEN: GroupRule(sigma / math.sqrt(m), self._depth(alpha - 1) / m, m, self._depth(-alpha) / m),
            Role.BLOCK_NORM: GroupRule(None, self._depth(alpha - 1), 1.0, 1.0),
            Role.FINAL_NORM: GroupRule(None, 1.0, 1.0, 1.0),
            Role.READOUT: GroupRule(readout_std, 1.0, 1.0, 1.0),
            Role.ROUTER: GroupRule(readout_std, 1.0, 1.0, 1.0),
        }
        return rules[role]

    @torch.no_grad()
    def init_weights(self, model: nn.Module, seed: int) -> None:
        """Initialise every parameter by its role from `seed` and its name alone, so a model that holds only
        some of the parameters (an expert-parallel shard) draws exactly the values the whole model would."""
        for name, param in model.named_parameters():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            std = self.rule(role_of(name, param)).init_std
            if std is None:
                param.fill_(1.0)
            elif std == 0.0:
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float, eps: float,
                     optimizer: Optimizer = "adamw", damping: float = 0.0) -> list[dict]:
        """Optimizer parameter groups, one per role present (and per optimizer: under `muon`, `shampoo`, `soap` or
        `kfac` the 2-D hidden matrices are a group of their own, marked "optimizer": its name). AdamW's and SOAP's
        groups carry "eps", Shampoo's and K-FAC's "damping" (from `damping`, its base value). LR schedules must scale
        these relatively."""
        by_group: dict[tuple[Role, Optimizer], list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                role = role_of(name, param)
                stepper = optimizer if optimizer != "adamw" and matrix_steps(role, param) else "adamw"
                by_group.setdefault((role, stepper), []).append(param)
        groups = []
        for (role, stepper), params in by_group.items():
            rule = self.rule(role, stepper)
            group = {"params": params, "name": role.value if stepper == "adamw" else f"{role.value}-{stepper}",
                     "optimizer": stepper, "lr": lr * rule.lr_mult, "weight_decay": weight_decay * rule.wd_mult}
            own = {"adamw": {"eps": eps * rule.eps_mult}, "soap": {"eps": eps * rule.eps_mult},
                   "shampoo": {"damping": damping * rule.eps_mult}, "kfac": {"damping": damping * rule.eps_mult}}
            groups.append({**group, **own.get(stepper, {})})
        return groups


def matrix_steps(role: Role, param: torch.Tensor) -> bool:
    """Whether a matrix optimizer (`muon`, `shampoo`, `soap`, `kfac`) steps this parameter when chosen: the hidden
    matrices (2-D)."""
    return role is Role.HIDDEN and param.dim() == 2
