"""K-FAC (Martens & Grosse, 2015, "Optimizing Neural Networks with Kronecker-factored Approximate Curvature") for
the weights of rung's linear layers: the Fisher block of a layer y = W·a is approximated by A ⊗ G, the second
moments of its inputs a and of the gradients ĝ of the per-token loss with respect to its outputs,

    G ← β₂·G + (1−β₂)·E[ĝ·ĝᵀ],   A ← β₂·A + (1−β₂)·E[a·aᵀ],   M ← β₁·M + (1−β₁)·∇W,
    D = (Ĝ + ρ_G·I)⁻¹ · M̂ · (Â + ρ_A·I)⁻¹,   Ĝ = G / (1−β₂ᵗ), Â likewise, M̂ = M / (1−β₁ᵗ),

with the damped inverses refreshed every `precondition_every` steps and kept in between (momentum on the raw
gradient, preconditioned when used, as rung's Shampoo does). The statistics come from hooks on the layers: a
forward hook keeps each input, a hook on the output tensor receives its gradient in backward, so a layer whose
activations are recomputed (activation checkpointing) is counted once, and forward passes without a backward
(evaluation) not at all. ĝ is the recorded gradient times the number of tokens one worker's gradient averages
over (`loss_tokens`, its micro-batches' tokens): the expectation is per token, whatever the batch or accumulation.

Damping is Tikhonov's, factored as Martens & Grosse factor it: one ρ (the group's "damping") split between the two
sides by π = √((tr Â / d_in) / (tr Ĝ / d_out)), ρ_A = π·√ρ, ρ_G = √ρ / π. The split tracks each factor's own scale:
under μP A's eigenvalues grow with width as G's shrink, and π grows with them — the per-side width rescaling of
the damping that Ishikawa & Karakida ask of K-FAC, with ρ itself constant (parametrization.py derives it).

Between a layer's first step and the first step on which both its factors are non-zero (a zero-initialised
readout sends no gradient back on the first step) the preconditioner is derived again every step: from an empty
factor there is nothing to invert, and the update is zero, as the gradient is.

Under data parallelism every worker sees its own tokens: the step's sums are all-reduced (one collective over all
layers) before they enter the factors, so every worker keeps the same state, as it keeps the same gradients.
Expert parallelism, where workers hold different layers, is refused before launch (`check_launchable`).

Why rung's own: the maintained PyTorch K-FAC (kfac-pytorch) is a preconditioner the training loop steps before
the optimizer, its factors in its own per-layer objects; DeepSpeed's engine steps one optimizer, and rung's
pickle-free checkpoints hold the optimizer's state as one named tensor per entry (`STATE`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn

from rung.jobs.train.kronecker import KroneckerFactored, eigh


class LayerStatistics:
    """The sums of a·aᵀ and g·gᵀ over the tokens one linear layer saw since they were last taken (made on the first
    token's device: DeepSpeed moves the model after the optimizer is built)."""

    def __init__(self, layer: nn.Linear):
        self.shapes = (layer.out_features, layer.in_features)
        self.grads: torch.Tensor | None = None
        self.inputs: torch.Tensor | None = None
        self.tokens = 0
        layer.register_forward_hook(self._forward)

    def _forward(self, _layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:
            seen = inputs[0].detach()
            output.register_hook(lambda grad: self._add(seen, grad))

    @torch.no_grad()
    def _add(self, inputs: torch.Tensor, grad: torch.Tensor) -> None:
        a = inputs.reshape(-1, inputs.shape[-1]).float()
        g = grad.reshape(-1, grad.shape[-1]).float()
        if self.grads is None:
            self.grads = g.new_zeros(self.shapes[0], self.shapes[0])
            self.inputs = a.new_zeros(self.shapes[1], self.shapes[1])
        self.grads.addmm_(g.T, g)
        self.inputs.addmm_(a.T, a)
        self.tokens += len(a)

    def take(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(G's sum, A's sum, token count) — zeros where no token came — and start the next sums afresh."""
        out, into = self.shapes
        if self.grads is None:
            taken = (torch.zeros(out, out, device=device), torch.zeros(into, into, device=device), 0)
        else:
            taken = (self.grads.to(device), self.inputs.to(device), self.tokens)
            self.grads = self.inputs = None  # the next sums start on the next token's device
        self.tokens = 0
        return taken


class KFAC(KroneckerFactored):
    """K-FAC over groups of linear layers' weights; each group has "lr", "weight_decay" and "damping"."""

    STATE = (*KroneckerFactored.STATE, "left_inverse", "right_inverse", "pi")  # left: G (outputs), right: A (inputs)
    HOST_STATE = ("pi",)  # refresh_due reads it every step
    GROUP_KEY = "damping"

    def __init__(self, groups: list[dict], layers: Iterable[nn.Module], betas: tuple[float, float],
                 precondition_every: int, loss_tokens: int):
        super().__init__(groups, betas, precondition_every)
        if loss_tokens < 1:
            raise ValueError(f"K-FAC's loss_tokens must be >= 1, got {loss_tokens}")
        self.loss_tokens = loss_tokens
        owners = {id(layer.weight): layer for layer in layers if isinstance(layer, nn.Linear)}
        self.recorders: dict[tuple[int, int], LayerStatistics] = {}
        for index, group in enumerate(self.param_groups):
            for position, param in enumerate(group["params"]):
                if id(param) not in owners or owners[id(param)].bias is not None:
                    raise ValueError("K-FAC steps the weights of bias-free nn.Linear layers only")
                self.recorders[(index, position)] = LayerStatistics(owners[id(param)])
        self._statistics: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def state_shapes(self, out: int, into: int) -> dict[str, tuple[int, ...]]:
        return {**super().state_shapes(out, into), "left_inverse": (out, out), "right_inverse": (into, into),
                "pi": ()}

    def _take_statistics(self) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """This step's E[ĝĝᵀ] and E[aaᵀ] per layer over every worker's tokens; a layer no token reached has none."""
        slots = sorted(self.recorders)
        if not slots:
            return {}
        device = self.param_groups[slots[0][0]]["params"][slots[0][1]].device
        taken = [self.recorders[slot].take(device) for slot in slots]
        # one buffer for one collective: every layer's two sums, then the token counts
        joined = torch.cat([t for grads, inputs, _ in taken for t in (grads.flatten(), inputs.flatten())]
                           + [torch.tensor([float(tokens) for _, _, tokens in taken], device=device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(joined)
        counts = joined[-len(slots):].tolist()  # the one read back to the host
        statistics, offset = {}, 0
        for slot, tokens in zip(slots, counts):
            out, into = self.recorders[slot].shapes
            grads = joined[offset:offset + out * out].view(out, out)
            inputs = joined[offset + out * out:offset + out * out + into * into].view(into, into)
            offset += out * out + into * into
            if tokens > 0:
                statistics[slot] = (grads * (self.loss_tokens ** 2 / tokens), inputs / tokens)
        return statistics

    @torch.no_grad()
    def step(self, closure=None):
        self._statistics = self._take_statistics()  # on every worker, every step: it is a collective
        return super().step(closure)

    def update_factors(self, state: dict, grad: torch.Tensor, beta2: float, slot: tuple[int, int]) -> None:
        if slot in self._statistics:
            grads, inputs = self._statistics[slot]
            state["left"].mul_(beta2).add_(grads, alpha=1 - beta2)
            state["right"].mul_(beta2).add_(inputs, alpha=1 - beta2)

    def refresh_due(self, state: dict, step: int, every: int) -> bool:
        return super().refresh_due(state, step, every) or float(state["pi"]) == 0

    def refresh(self, state: dict, group: dict, step: int) -> None:
        correction = 1 - group["betas"][1] ** step
        grads, inputs = state["left"] / correction, state["right"] / correction
        grads_mean, inputs_mean = float(grads.trace()) / len(grads), float(inputs.trace()) / len(inputs)
        if not (grads_mean > 0 and inputs_mean > 0):  # module docstring: nothing to invert yet
            for key in ("left_inverse", "right_inverse", "pi"):
                state[key].zero_()
            return
        pi = math.sqrt(inputs_mean / grads_mean)
        root = math.sqrt(group["damping"])
        state["left_inverse"].copy_(_damped_inverse(grads, root / pi))
        state["right_inverse"].copy_(_damped_inverse(inputs, root * pi))
        state["pi"].fill_(pi)

    def direction(self, state: dict, group: dict, grad: torch.Tensor, step: int) -> torch.Tensor:
        return state["left_inverse"] @ state["momentum"] @ state["right_inverse"] / (1 - group["betas"][0] ** step)


def _damped_inverse(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """(factor + damping·I)⁻¹ of a symmetric positive semi-definite factor."""
    values, vectors = eigh(factor, damping)
    return ((vectors / values.clamp(min=damping)) @ vectors.T).to(factor.dtype)
