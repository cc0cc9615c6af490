"""Bytes per device of a training run: the model states ZeRO partitions, the activations of a micro-batch, and what
is left on the card — the memory half of `rung plan`.

Model states (DeepSpeed's layout, per device, with P parameters, N data-parallel devices and E-way expert
parallelism holding 1/E of the experts' P_e; the states ZeRO shards are P/N per device either way):
- parameters in the training dtype, whole below ZeRO-3 (P - P_e + P_e/E), P/N at ZeRO-3 plus the gathered ones
  it may keep live (stage3_max_live_parameters, 1e9: the whole model below that, as measured);
- gradients in the training dtype: whole at ZeRO 0-1 (bf16 at ZeRO-0 adds DeepSpeed's fp32 accumulation buffer),
  P/N at ZeRO 2-3, plus at ZeRO 1-2 the partition's fp32 gradients flattened for the update, and at ZeRO-3 the
  reduction bucket (DeepSpeed's reduce_bucket_size, 5e8 elements, allocated whole on a GPU: a model below 5e8
  parameters touches only its own size of it on a CPU, and is counted so);
- optimizer: AdamW's two fp32 moments, plus an fp32 master copy of the partition wherever DeepSpeed keeps one
  (every bf16 run, and ZeRO 1-3 in fp32, where the optimizer steps a flat copy): 8P at fp32 ZeRO-0, else 12P/N.
  train.offload moves it (and with `all` the parameters) to host memory.
Activations come from `activations.activation_bytes` (traced from the model's code), times the micro-batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from rung.jobs.config import RunConfig
from rung.jobs.model.counting import count
from rung.jobs.planning.activations import activation_bytes


# DeepSpeed's defaults, which rung leaves as they are
REDUCE_BUCKET_ELEMENTS = 500_000_000  # reduce_bucket_size
MAX_LIVE_PARAMETERS = 1_000_000_000  # stage3_max_live_parameters: gathered parameters ZeRO-3 may keep at once


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Peak bytes per device of one training step, by kind; `host` is what offload moves to CPU memory."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int  # kept from forward to backward, for the whole micro-batch
    backward_working_set: int  # the largest extra working set in backward (logits' gradient, a recomputed block)
    host: int
    per_sequence: int  # of activations + backward working set, one sequence's share

    @property
    def states(self) -> int:
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations + self.backward_working_set

    def largest_micro_batch(self, usable_bytes: int) -> int:
        """The most sequences per micro-batch whose peak stays within `usable_bytes` (0: not even one)."""
        return max(0, (usable_bytes - self.states) // self.per_sequence)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def expert_parameters(cfg: RunConfig) -> int:
    """Parameters of the routed experts (what expert parallelism divides)."""
    moe, model = cfg.model.moe, cfg.model
    return 0 if moe is None else model.n_layers * moe.n_experts * 3 * model.d_model * model.ffn_hidden


def model_state_bytes(cfg: RunConfig, devices: int) -> tuple[int, int, int, int]:
    """(parameters, gradients, optimizer, host) bytes per device for `devices` data-parallel devices."""
    train = cfg.train
    total = count(cfg.model, train.seq_len).total_params
    experts = expert_parameters(cfg)
    local = total - experts + experts // train.expert_parallel
    shard = -(-total // devices)
    element = 2 if train.dtype == "bfloat16" else 4
    stage = train.zero_stage
    if stage == 3:
        parameters = element * (shard + min(local, MAX_LIVE_PARAMETERS))
        gradients = element * (shard + min(local, REDUCE_BUCKET_ELEMENTS))
    else:
        parameters = element * local
        gradients = element * (local if stage < 2 else shard)
        if stage in (1, 2):
            gradients += 4 * shard
        if stage == 0 and element == 2:
            gradients += 4 * local
    optimizer = 8 * local if stage == 0 and element == 4 else 12 * shard
    host = 0
    if train.offload != "none":
        host, optimizer = optimizer, 0
        if train.offload == "all":
            host += element * shard
            parameters -= element * shard
    return parameters, gradients, optimizer, host


def estimate(cfg: RunConfig, devices: int, micro_batch: int | None = None) -> MemoryEstimate:
    """The peak of one training step per device, at `micro_batch` sequences (default: the config's)."""
    micro_batch = cfg.train.micro_batch if micro_batch is None else micro_batch
    parameters, gradients, optimizer, host = model_state_bytes(cfg, devices)
    kept, working = activation_bytes(cfg).per_micro_batch(cfg.model.n_layers, cfg.train.activation_checkpointing)
    return MemoryEstimate(parameters=parameters, gradients=gradients, optimizer=optimizer,
                          activations=kept * micro_batch, backward_working_set=working * micro_batch, host=host,
                          per_sequence=kept + working)
