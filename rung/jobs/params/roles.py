"""Parameter roles: the model tags each parameter where it creates it; the parametrization reads the tags.

Tagging at creation (rather than matching parameter names by suffix) means a new layer cannot silently fall into
the wrong μP group: an untagged parameter makes the parametrization raise.
"""

from __future__ import annotations

from enum import Enum

from torch import nn


class Role(str, Enum):
    EMBEDDING = "embedding"  # token embedding (also the readout when tied)
    HIDDEN = "hidden"  # matrices inside blocks: q, k, v, o, FFN and expert matrices
    BLOCK_NORM = "block_norm"  # norm gains inside residual blocks
    FINAL_NORM = "final_norm"  # the norm before the readout, outside every residual branch
    READOUT = "readout"  # untied LM head
    ROUTER = "router"  # MoE gate: follows the readout rule (mup #48)


_ATTR = "rung_role"


def tag(module: nn.Module, role: Role) -> nn.Module:
    """Give every parameter directly owned by `module` the role `role`; returns the module for chaining."""
    for param in module.parameters(recurse=False):
        setattr(param, _ATTR, role)
    return module


def role_of(name: str, param: nn.Parameter) -> Role:
    role = getattr(param, _ATTR, None)
    if role is None:
        raise ValueError(f"parameter {name} has no role; tag it with rung.jobs.params.roles.tag where it is created")
    return role
