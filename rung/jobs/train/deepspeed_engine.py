"""The DeepSpeed engine a worker trains with: ZeRO stage, precision, gradient accumulation to a fixed global batch,
the optimizer `train.optimizer` names (`optimizers.py`) with one parameter group per parametrization role, the LR
schedule, and expert placement.

Gradient clipping: DeepSpeed's own optimizers (ZeRO 1-3, bf16) compute the global gradient norm, skip a step whose
norm is not finite and clip. Under ZeRO-0 fp32 DeepSpeed steps torch's AdamW directly and reports no norm, so
rung's DivergenceGuard computes the norm before the step, checks it and clips with it (`guard.py`), and DeepSpeed's
clipping is off there.
"""

from __future__ import annotations

import shutil
import warnings
from functools import partial

import torch

from rung.errors import ConfigError
from rung.jobs.config import RunConfig
from rung.jobs.model.build import build_model
from rung.jobs.model.expert_parallel import mark_expert_parameters, setup_expert_parallel
from rung.jobs.train.optimizers import MATRIX_OPTIMIZERS, build_optimizer, damping
from rung.jobs.train.schedule import lr_factor


def rung_clips(cfg: RunConfig) -> bool:
    """Whether rung (not DeepSpeed) computes the gradient norm and clips: ZeRO-0 with fp32 weights."""
    return cfg.train.zero_stage == 0 and cfg.train.dtype == "float32"


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    train = cfg.train
    per_step = train.micro_batch * world_size
    if train.global_batch % per_step:
        raise ConfigError("train.global_batch", f"{train.global_batch} is not a multiple of micro_batch × workers "
                          f"({train.micro_batch} × {world_size})")
    return {
        "train_batch_size": train.global_batch,
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.global_batch // per_step,
        "gradient_clipping": 0.0 if rung_clips(cfg) else train.grad_clip,
        "zero_optimization": {"stage": train.zero_stage, **_offload(train.offload)},
        # a non-finite gradient norm skips the step (and is reported as inf) before any weight changes
        "bf16": {"enabled": train.dtype == "bfloat16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: DeepSpeed's own optimizers JIT-compile on CPU
        "zero_force_ds_cpu_optimizer": False,  # offload steps torch's AdamW on the host, not DeepSpeedCPUAdam
        "steps_per_print": 1 << 30,
    }


def _offload(offload: str) -> dict:
    """DeepSpeed's ZeRO-3 offload sections: pinned host memory for the optimizer state (and the parameters)."""
    if offload == "none":
        return {}
    cpu = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"offload_optimizer": cpu, **({"offload_param": cpu} if offload == "all" else {})}


def check_launchable(cfg: RunConfig, world_size: int) -> None:
    """Reject what no worker group can run, before any worker starts."""
    if cfg.train.optimizer in MATRIX_OPTIMIZERS and cfg.train.zero_stage != 0:
        raise ConfigError("train.optimizer", f"{cfg.train.optimizer} preconditions whole matrices, and ZeRO stage "
                          f"{cfg.train.zero_stage} hands the optimizer flat partitions of them: use "
                          "train.zero_stage=0")
    if cfg.train.optimizer == "kfac" and cfg.train.expert_parallel > 1:
        raise ConfigError("train.optimizer", "kfac all-reduces its layer statistics over every worker, and expert "
                          "parallelism gives workers different experts: use train.expert_parallel=1")
    if cfg.train.optimizer == "kfac" and cfg.train.compile:
        raise ConfigError("train.compile", "kfac reads each linear layer's inputs and output gradients in hooks, "
                          "which a compiled block would break its graph on: use train.compile=false")
    if cfg.train.layerdrop and cfg.train.zero_stage == 3:
        raise ConfigError("train.layerdrop", "ZeRO stage 3 steps a dropped layer's partitions differently from "
                          "stages 0-2, which give it a zero gradient (its losses part from theirs): use ZeRO 0-2")
    if cfg.train.zero_stage == 3 and cfg.model.moe is not None:
        raise ConfigError("train.zero_stage", "ZeRO stage 3 cannot train MoE models (DeepSpeed does not support it)")
    if cfg.train.offload != "none" and cfg.train.zero_stage != 3:
        raise ConfigError("train.offload", f"{cfg.train.offload!r} needs ZeRO stage 3 (train.zero_stage=3), got stage "
                          f"{cfg.train.zero_stage}")
    if cfg.train.compile and (cfg.model.moe is not None or cfg.train.zero_stage == 3):
        raise ConfigError("train.compile", "compiles dense models at ZeRO 0-2 only: an MoE layer's routing has "
                          "data-dependent shapes, and ZeRO-3 gathers parameters in hooks a compiled block would "
                          "break its graph on")
    deepspeed_config(cfg, world_size)


def compile_blocks(model) -> None:
    """torch.compile every transformer block in place: one graph per block shape (the blocks share their code, so
    Dynamo compiles it once), the embedding, norm and head left eager. Inductor needs a C++ compiler on a CPU;
    without one the blocks stay eager, with a warning."""
    if not torch.cuda.is_available() and not (shutil.which("c++") or shutil.which("g++")):
        warnings.warn("train.compile: no C++ compiler for Inductor's CPU backend; the blocks run eager", stacklevel=2)
        return
    for block in model.layers:
        block.compile()


def build_engine(cfg: RunConfig, world_size: int = 1):
    """The DeepSpeed engine for `cfg`, with one optimizer group per parametrization role and a relative schedule."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    check_launchable(cfg, world_size)
    ep = cfg.train.expert_parallel
    placement = setup_expert_parallel(ep, cfg.model.moe.n_experts) if ep > 1 else None
    model, param = build_model(cfg, placement=placement)
    model.checkpoint_activations(cfg.train.activation_checkpointing)
    if cfg.train.compile:
        compile_blocks(model)
    groups = param.param_groups(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_eps,
                                cfg.train.optimizer, damping(cfg.train))
    if placement is not None:
        mark_expert_parameters(model, placement)
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # loss_tokens: the tokens one worker's gradient averages over (its micro-batches, accumulated)
    optimizer = build_optimizer(cfg.train, groups, model,
                                loss_tokens=cfg.train.global_batch * cfg.train.seq_len // world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg=cfg.train))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world_size))
    if world_size == 1 and cfg.train.zero_stage == 0:
        # One worker has nothing to all-reduce, yet DeepSpeed would still flatten, "reduce" and copy back every
        # gradient each step (ZeRO 1-3 need that path to fill their partitions, ZeRO-0 does not).
        engine.enable_backward_allreduce = False
    return engine
