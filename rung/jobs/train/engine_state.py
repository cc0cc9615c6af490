"""The full training state of a DeepSpeed engine as plain tensors, whatever the ZeRO stage — and back.

Checkpoints hold consolidated fp32 weights and optimizer state (AdamW's moments, Muon's momentum, Shampoo's, SOAP's
and K-FAC's factors, preconditioners and moments: `state_keys`) keyed by parameter name, never DeepSpeed's pickled shard
files: nothing is unpickled on load, export reads the weights directly, and a run may resume on a different
number of workers. Every rank must call `gather_state`/`restore_state` (ZeRO shards are assembled collectively).

Where the fp32 master copy and Adam moments live:
- ZeRO 1/2/3 (fp32 or bf16): partitioned; DeepSpeed's `safe_get/set_full_*` assemble and scatter them;
- ZeRO-0 fp32: the parameter itself and torch AdamW's state for it;
- ZeRO-0 bf16: DeepSpeed's unfused optimizer keeps an fp32 copy per parameter (`fp32_groups`), and creates the
  optimizer's state by stepping it once with zero gradients when it is built, so AdamW's step counter (its bias
  correction) runs one ahead of the engine's steps there (the Kronecker-factored ones take that step as none):
  `restore_state` reads each counter of the freshly built engine and adds the checkpoint's step to it.
"""

from __future__ import annotations

import torch
from deepspeed import zero
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state)

from rung.jobs.model.expert_parallel import gather_expert_tensors
from rung.jobs.train.optimizers import ADAMW_STATE, initial_state, state_keys


def _inner_optimizer(engine) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizer


def _is_sharded(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _master(engine, param: torch.nn.Parameter) -> torch.nn.Parameter:
    """The fp32 tensor the optimizer updates for `param` when DeepSpeed does not shard it."""
    groups = getattr(engine.optimizer, "fp16_groups", None)
    if groups is None or isinstance(engine.optimizer, torch.optim.Optimizer):
        return param
    for low, high in zip(groups, engine.optimizer.fp32_groups):
        for lp, hp in zip(low, high):
            if lp is param:
                return hp
    raise KeyError("parameter not managed by the optimizer")


def _link_optimizer_state(engine) -> None:
    """Make every optimizer state exist and be visible through DeepSpeed's per-parameter fragment views.

    torch's AdamW creates its state on the first step, and ZeRO-1/2 build their per-parameter views of that state
    once, right after the first group steps — so groups stepped later stay unlinked (empty) for the rest of the
    run, and a fresh engine has nothing to restore into. Creating the (zero) state and relinking fixes both."""
    inner = _inner_optimizer(engine)
    flats = [p for group in inner.param_groups for p in group["params"]]
    flats += getattr(engine.optimizer, "fp32_partitioned_groups_flat", [])  # ZeRO-3 swaps these in per step
    for flat in flats:
        if not inner.state[flat]:
            inner.state[flat] = initial_state(inner, flat)
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


def gather_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights, optimizer moments): full fp32 tensors on the CPU, keyed by parameter name."""
    weights, moments = {}, {}
    _link_optimizer_state(engine)
    inner = _inner_optimizer(engine)
    for name, param in engine.module.named_parameters():
        if _is_sharded(param):
            weights[name] = safe_get_full_fp32_param(param).detach().float().cpu()
            for key in ADAMW_STATE:  # ZeRO 1-3 run AdamW only (check_launchable)
                moments[f"{key}/{name}"] = safe_get_full_optimizer_state(param, key).detach().float().cpu()
            continue
        master = _master(engine, param)
        weights[name] = master.detach().float().cpu().clone()
        state = inner.state.get(master, {})
        for key in state_keys(inner, master):
            moments[f"{key}/{name}"] = (state[key] if key in state else initial_state(inner, master)[key]
                                        ).detach().float().cpu().clone()
    placement = getattr(engine.module, "expert_placement", None)
    if placement is not None and placement.ep_size > 1:  # other ranks' experts complete the picture
        weights, moments = gather_expert_tensors(weights, placement), gather_expert_tensors(moments, placement)
    return weights, moments


def restore_state(engine, weights: dict[str, torch.Tensor], moments: dict[str, torch.Tensor], step: int) -> None:
    """Put a gathered state back into a freshly built `engine` as if it had just finished optimizer step `step`."""
    inner = _inner_optimizer(engine)
    ahead = {id(p): float(state["step"]) for p, state in inner.state.items() if "step" in state}  # module docstring
    _link_optimizer_state(engine)
    for name, param in engine.module.named_parameters():
        value = weights[name]
        with zero.GatheredParameters([param], modifier_rank=0):  # ZeRO-3: full view, re-partitioned on exit
            param.data.copy_(value.to(param.device, param.dtype))
        if _is_sharded(param):
            safe_set_full_fp32_param(param, value.to(engine.device))
            for key in ADAMW_STATE:
                safe_set_full_optimizer_state(param, moments[f"{key}/{name}"].to(engine.device), key)
            continue
        master = _master(engine, param)
        if master is not param:
            master.data.copy_(value.to(master.device))
        state = inner.state[master]
        for key in state_keys(inner, master):
            state[key] = moments[f"{key}/{name}"].to(state[key].device).clone()  # where the optimizer keeps it
    for param, state in inner.state.items():  # sharded flat partitions carry their own step counters
        if "step" in state:  # torch's Muon keeps none
            state["step"] = torch.full_like(state["step"], step + ahead.get(id(param), 0.0))  # its device and dtype
    scheduler = engine.lr_scheduler  # a LambdaLR: each group's LR is its base LR × factor(step)
    scheduler.last_epoch = step
    for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    accumulation = engine.gradient_accumulation_steps()
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    engine.micro_steps = step * accumulation
