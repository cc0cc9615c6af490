"""Mixture-of-Experts feed-forward: top-k softmax routing, capacity dropping or dropless, optional shared expert.

Routing follows Mixtral: softmax over all experts, keep the top k, renormalise their gates to sum to one. Capacity
is ceil(capacity_factor · tokens · k / E) slots per expert, filled slot-major first-come-first-served: every token's
first choice is placed before any token's second choice, so overflow drops the least-preferred assignments first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rung.jobs.config import MoEConfig
from rung.jobs.model.expert_parallel import ExpertPlacement, exchange, exchange_counts
from rung.jobs.model.layers import SwiGLU
from rung.jobs.params.roles import Role, tag


@dataclass(slots=True)
class Routing:
    probs: torch.Tensor  # [tokens, E] softmax over all experts
    experts: torch.Tensor  # [tokens, k] chosen expert ids, best first
    gates: torch.Tensor  # [tokens, k] renormalised top-k weights (zero where dropped)
    kept: torch.Tensor  # [tokens, k] bool: the assignment found a slot


class RouterStats(NamedTuple):  # a NamedTuple so DeepSpeed ZeRO-3 hooks can find the tensors inside
    """What one MoE layer reports per step: its losses (unweighted) and how the load fell."""

    aux_loss: torch.Tensor  # Switch load-balancing loss; 1.0 when perfectly balanced
    z_loss: torch.Tensor
    dropped_fraction: torch.Tensor  # share of token-expert assignments that found no slot
    expert_load: torch.Tensor  # [E] share of assignments routed to each expert


def expert_capacity(num_tokens: int, top_k: int, n_experts: int, capacity_factor: float | None) -> int | None:
    if capacity_factor is None:
        return None
    return math.ceil(capacity_factor * num_tokens * top_k / n_experts)


def route(logits: torch.Tensor, top_k: int, capacity: int | None) -> Routing:
    """Pick each token's top-k experts and drop assignments beyond `capacity` (None: keep all)."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_probs, experts = probs.topk(top_k, dim=-1)
    gates = top_probs / top_probs.sum(dim=-1, keepdim=True)
    if capacity is None:
        kept = torch.ones_like(experts, dtype=torch.bool)
    else:
        slot_major = experts.t().reshape(-1)  # all first choices, then all second choices, ...
        one_hot = F.one_hot(slot_major, probs.shape[-1])
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of this assignment within its expert
        kept = (position < capacity).view(top_k, -1).t()
    return Routing(probs=probs, experts=experts, gates=gates * kept, kept=kept)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's E · Σ_i f_i · P_i, with f_i the share of assignments to expert i and P_i its mean
    router probability. It is 1 for a perfectly balanced assignment and grows to E when one expert takes all."""
    n_experts = probs.shape[-1]
    load = torch.bincount(experts.reshape(-1), minlength=n_experts).float() / experts.numel()
    return n_experts * (load * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


class MoEFeedForward(nn.Module):
    """Routed experts (grouped by expert, never a per-token loop), optionally spread over an EP group."""

    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig, router_mult: float,
                 placement: ExpertPlacement | None = None):
        super().__init__()
        self.cfg = cfg
        self.router_mult = router_mult
        self.placement = placement
        self.router = tag(nn.Linear(d_model, cfg.n_experts, bias=False), Role.ROUTER)
        local = placement.local_ids if placement else range(cfg.n_experts)
        self.experts = nn.ModuleDict({str(index): SwiGLU(d_model, hidden) for index in local})
        self.shared_expert = SwiGLU(d_model, hidden) if cfg.shared_expert else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens) * self.router_mult
        capacity = expert_capacity(tokens.shape[0], self.cfg.top_k, self.cfg.n_experts, self.cfg.capacity_factor)
        routing = route(logits, self.cfg.top_k, capacity)
        token_ids, slot = torch.nonzero(routing.kept, as_tuple=True)
        expert_ids = routing.experts[token_ids, slot]
        gates = routing.gates[token_ids, slot].unsqueeze(-1).to(tokens.dtype)
        if self.placement is None or self.placement.ep_size == 1:
            outputs = self._run_grouped(tokens[token_ids], expert_ids)
        else:
            outputs = self._run_expert_parallel(tokens[token_ids], expert_ids)
        out = torch.zeros_like(tokens).index_add(0, token_ids, outputs * gates)
        if self.shared_expert is not None:
            out = out + self.shared_expert(tokens)
        load = torch.bincount(routing.experts.reshape(-1), minlength=self.cfg.n_experts).float() / routing.experts.numel()
        stats = RouterStats(aux_loss=load_balance_loss(routing.probs, routing.experts), z_loss=router_z_loss(logits),
                            dropped_fraction=1.0 - routing.kept.float().mean(), expert_load=load)
        return out.view(shape), stats

    def _run_grouped(self, inputs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Each local expert on its tokens as one batch; outputs returned in the inputs' order. Every expert runs,
        on an empty batch if need be, so every rank builds the same autograd graph (ZeRO's reduction hooks
        expect it)."""
        first = int(next(iter(self.experts)))
        order = torch.argsort(expert_ids, stable=True)
        counts = torch.bincount(expert_ids - first, minlength=len(self.experts)).tolist()
        chunks = inputs[order].split(counts)
        grouped = torch.cat([expert(chunk) for expert, chunk in zip(self.experts.values(), chunks)])
        return grouped[torch.argsort(order)]

    def _run_expert_parallel(self, inputs: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Send each assignment to the rank owning its expert, compute there, and bring the result back."""
        placement = self.placement
        order = torch.argsort(expert_ids, stable=True)  # sorted by expert = grouped by destination rank
        send = torch.bincount(expert_ids // placement.num_local, minlength=placement.ep_size)
        recv = exchange_counts(send, placement.group)
        send = send.tolist()
        received = exchange(inputs[order], send, recv, placement.group)
        received_ids = exchange(expert_ids[order], send, recv, placement.group)
        results = self._run_grouped(received, received_ids)
        returned = exchange(results, recv, send, placement.group)
        return returned[torch.argsort(order)]
