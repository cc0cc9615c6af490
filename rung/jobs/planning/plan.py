"""`rung plan`: will a training config fit on N GPUs of a kind, with which micro-batch, and how long will it take.

Memory per GPU comes from `memory.estimate`; a card is usable up to `gpus.USABLE_FRACTION` of its memory. Time comes from the FLOP count
(`counting.count`, PaLM's convention) at a stated MFU: recomputation adds forward FLOPs the MFU does not credit —
a full block's forward under `full` (+1/3 of the block FLOPs), the FFN's forward under `selective`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rung.jobs.config import RunConfig
from rung.jobs.model.counting import count
from rung.jobs.planning.memory import MemoryEstimate, estimate
from rung.platform.gpus import GPU, PLANNING_MFU, USABLE_FRACTION


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    gpu: GPU
    gpus: int
    micro_batch: int
    memory: MemoryEstimate
    usable_bytes: int
    largest_micro_batch: int  # capped at the global batch's share per GPU; 0: not even one sequence fits
    step_seconds: float
    tokens_per_second: float
    total_hours: float
    mfu: float
    serving_kv_bytes_per_token: int  # bf16 KV cache of one token, all layers
    serving_kv_tokens: int  # tokens of KV cache one card holds next to the bf16 weights

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.usable_bytes

    def as_dict(self) -> dict:
        return {"gpu": self.gpu.name, "gpus": self.gpus, "micro_batch": self.micro_batch, "fits": self.fits,
                "memory_per_gpu": self.memory.as_dict(), "usable_bytes_per_gpu": self.usable_bytes,
                "largest_micro_batch": self.largest_micro_batch, "assumed_mfu": self.mfu,
                "step_seconds": self.step_seconds, "tokens_per_second": self.tokens_per_second,
                "total_hours": self.total_hours, "serving_kv_bytes_per_token": self.serving_kv_bytes_per_token,
                "serving_kv_tokens_per_gpu": self.serving_kv_tokens}


def recompute_factor(cfg: RunConfig) -> float:
    """Executed FLOPs over counted (model) FLOPs for the activation-checkpointing mode."""
    mode = cfg.train.activation_checkpointing
    if mode == "none":
        return 1.0
    size = count(cfg.model, cfg.train.seq_len)
    model = cfg.model
    blocks_forward = 2 * (size.active_params - size.embedding_params) + 4 * model.n_layers * model.n_heads \
        * model.resolved_head_dim * cfg.train.seq_len
    if mode == "selective":
        experts = cfg.model.moe.top_k + cfg.model.moe.shared_expert if cfg.model.moe else 1
        blocks_forward = 2 * model.n_layers * 3 * model.d_model * model.ffn_hidden * experts
    return 1.0 + blocks_forward / size.flops_per_token


def plan_training(cfg: RunConfig, gpus: int, gpu: GPU, mfu: float = PLANNING_MFU) -> TrainingPlan:
    usable = int(gpu.memory_bytes * USABLE_FRACTION)
    memory = estimate(cfg, gpus)
    largest = min(memory.largest_micro_batch(usable), cfg.train.global_batch // gpus)
    size = count(cfg.model, cfg.train.seq_len)
    tokens = cfg.train.global_batch * cfg.train.seq_len
    step = size.flops_per_token * tokens * recompute_factor(cfg) / (gpus * gpu.peak_flops(cfg.train.dtype) * mfu)
    model = cfg.model
    kv_per_token = 2 * model.n_layers * model.resolved_kv_heads * model.resolved_head_dim * 2
    kv_tokens = max(0, usable - 2 * size.total_params) // kv_per_token
    return TrainingPlan(gpu=gpu, gpus=gpus, micro_batch=cfg.train.micro_batch, memory=memory, usable_bytes=usable,
                        largest_micro_batch=largest, step_seconds=step, tokens_per_second=tokens / step,
                        total_hours=step * cfg.train.steps / 3600, mfu=mfu, serving_kv_bytes_per_token=kv_per_token,
                        serving_kv_tokens=kv_tokens)


def report(cfg: RunConfig, plan: TrainingPlan) -> str:
    """The plan as the console shows it."""
    gib = lambda n: f"{n / (1 << 30):8.2f} GiB"  # noqa: E731
    m, train = plan.memory, cfg.train
    size = count(cfg.model, train.seq_len)
    lines = [f"{cfg.name}: {size.total_params / 1e9:.2f}B parameters, {train.dtype}, ZeRO-{train.zero_stage}, "
             f"activation checkpointing {train.activation_checkpointing}, offload {train.offload}",
             f"on {plan.gpus} x {plan.gpu.name} ({plan.gpu.memory_bytes / (1 << 30):.0f} GiB), micro-batch "
             f"{plan.micro_batch} x {train.seq_len} tokens, global batch {train.global_batch}",
             "memory per GPU:",
             f"  parameters           {gib(m.parameters)}", f"  gradients            {gib(m.gradients)}",
             f"  optimizer state      {gib(m.optimizer)}", f"  activations          {gib(m.activations)}",
             f"  backward working set {gib(m.backward_working_set)}", f"  total                {gib(m.total)}"
             f"  of {gib(plan.usable_bytes).strip()} usable ({USABLE_FRACTION:.0%})"]
    if m.host:
        lines.append(f"  offloaded to host    {gib(m.host)}")
    lines.append(("fits" if plan.fits else "does NOT fit") + f"; the largest micro-batch that fits: "
                 f"{plan.largest_micro_batch}" + (" (none)" if plan.largest_micro_batch == 0 else ""))
    lines.append(f"time at {plan.mfu:.0%} MFU: {plan.step_seconds:.3f} s per step, {plan.tokens_per_second:,.0f} "
                 f"tokens/s, {plan.total_hours:,.1f} h for {train.steps:,} steps")
    lines.append(f"serving: {plan.serving_kv_bytes_per_token:,} bytes of bf16 KV cache per token; one card holds "
                 f"{plan.serving_kv_tokens:,} tokens next to the bf16 weights")
    return "\n".join(lines)
