"""Expert parallelism: each rank of an expert-parallel (EP) group holds n_experts / ep of every MoE layer's experts,
and tokens travel to the rank that owns their expert and back through all-to-all (gloo on CPU, NCCL on GPUs).

Gradients: an expert's parameters exist only on the ranks at the same position of every EP group (its
expert-data-parallel group). DeepSpeed already reduces such parameters over that group and averages by the full
data-parallel size — which is exactly right here, because the all-to-all's backward has already summed the
contributions of every token in the EP group. DeepSpeed keys that machinery on its own MoE layer class, so
`DeepSpeedMoEMarker` (a parameter-free module) is attached to tell the engine the model has expert parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_to_all_single


@dataclass(frozen=True)
class ExpertPlacement:
    ep_size: int
    ep_rank: int
    n_experts: int
    group: object  # the torch process group of this rank's EP group

    @property
    def num_local(self) -> int:
        return self.n_experts // self.ep_size

    @property
    def local_ids(self) -> range:
        return range(self.ep_rank * self.num_local, (self.ep_rank + 1) * self.num_local)

    @property
    def group_name(self) -> str:
        return f"ep_size_{self.ep_size}"  # DeepSpeed's name for the groups it creates below


def setup_expert_parallel(ep_size: int, n_experts: int) -> ExpertPlacement:
    """Create DeepSpeed's expert and expert-data-parallel groups (consecutive ranks form an EP group)."""
    from deepspeed.utils import groups

    groups._create_expert_and_data_parallel(ep_size)
    name = f"ep_size_{ep_size}"
    return ExpertPlacement(ep_size=ep_size, ep_rank=dist.get_rank() % ep_size, n_experts=n_experts,
                           group=groups._get_expert_parallel_group(name))


def mark_expert_parameters(model: nn.Module, placement: ExpertPlacement) -> None:
    """Keep expert parameters out of the all-rank gradient all-reduce; reduce them over their own group."""
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        def __init__(self):
            nn.Module.__init__(self)  # a marker only: no gate, no experts, no parameters
            self.num_experts = placement.n_experts
            self.num_local_experts = placement.num_local
            self.ep_size = placement.ep_size
            self.expert_group_name = placement.group_name

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            """The groups were created by setup_expert_parallel."""

    for name, param in model.named_parameters():
        if ".experts." in name:
            param.allreduce = False
            param.group_name = placement.group_name
    model.deepspeed_moe_marker = DeepSpeedMoEMarker()


def exchange(tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """Differentiable uneven all-to-all along dim 0 (its backward sends gradients back the same way)."""
    out = tensor.new_empty((sum(recv_counts), *tensor.shape[1:]))
    return all_to_all_single(out, tensor.contiguous(), recv_counts, send_counts, group=group)


def exchange_counts(send_counts: torch.Tensor, group) -> list[int]:
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=group)
    return recv.tolist()


_EXPERT_KEY = re.compile(r"^(.*\.experts\.)(\d+)(\..*)$")


def gather_expert_tensors(tensors: dict[str, torch.Tensor], placement: ExpertPlacement) -> dict[str, torch.Tensor]:
    """Complete this rank's name → tensor dict with every expert's tensors, each broadcast by the first rank that
    owns it, so a checkpoint holds the whole model whatever the EP layout. Collective over all ranks."""
    patterns = sorted({(m.group(1), m.group(3)) for key in tensors if (m := _EXPERT_KEY.match(key))})
    template = {(m.group(1), m.group(3)): tensors[key] for key in tensors if (m := _EXPERT_KEY.match(key))}
    full = dict(tensors)
    for head, tail in patterns:
        for expert in range(placement.n_experts):
            key = f"{head}{expert}{tail}"
            tensor = full.get(key)
            if tensor is None:
                tensor = torch.empty_like(template[(head, tail)])
            dist.broadcast(tensor, src=expert // placement.num_local)  # EP group 0 holds ranks 0..ep-1
            full[key] = tensor
    return full
