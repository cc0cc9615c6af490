"""The run config schema: model shape, parametrization, data and training, validated field by field.

Field comments are the documentation; `__post_init__` checks each component on its own, `RunConfig` checks the
constraints between components (e.g. the tokenizer must fit the model's vocabulary). Configs are frozen: a changed
config is made with `rung.config.evolve`, which validates the whole of it again.
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field
from typing import Literal

from rung.config import evolve
from rung.errors import ConfigError

Parametrization = Literal["sp", "mup", "depth-mup", "completep"]
DType = Literal["float32", "bfloat16"]
Optimizer = Literal["adamw", "muon", "shampoo", "soap", "kfac"]  # train.optimizer (rung/jobs/train/optimizers.py)
Recompute = Literal["none", "full", "selective"]  # activation checkpointing (Transformer.checkpoint_activations)


@dataclass(kw_only=True, slots=True, frozen=True)
class MoEConfig:
    n_experts: int = 4
    top_k: int = 2
    # Slots per expert = ceil(capacity_factor * tokens * top_k / n_experts); overflow is dropped. None = dropless.
    capacity_factor: float | None = 1.25
    shared_expert: bool = False  # an always-on SwiGLU beside the routed experts, ungated
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    z_loss_coef: float = 0.001  # router z-loss weight

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ConfigError("n_experts", f"must be >= 1, got {self.n_experts}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ConfigError("top_k", f"must be between 1 and n_experts ({self.n_experts}), got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ConfigError("capacity_factor", f"must be > 0 (or null for dropless), got {self.capacity_factor}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must be >= 0")


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128  # width
    n_layers: int = 2  # depth
    n_heads: int = 4
    n_kv_heads: int | None = None  # grouped-query attention; None = n_heads
    head_dim: int | None = None  # None = d_model // n_heads
    ffn_mult: float = 8 / 3  # SwiGLU hidden = ffn_mult * d_model, rounded up to ffn_multiple_of
    ffn_multiple_of: int = 16
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 512
    moe: MoEConfig | None = None  # None = dense

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ConfigError("d_model", f"{self.d_model} is not divisible by n_heads ({self.n_heads})")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError("head_dim", f"must be an even number >= 2 (rotary embeddings), got {self.head_dim}")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError("n_kv_heads", f"{self.n_kv_heads} does not divide n_heads ({self.n_heads})")
        if self.resolved_head_dim % 2:
            raise ConfigError("head_dim", f"d_model / n_heads = {self.resolved_head_dim} must be even (rotary)")
        if self.ffn_mult <= 0:
            raise ConfigError("ffn_mult", f"must be > 0, got {self.ffn_mult}")

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def resolved_kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_hidden(self) -> int:
        raw = int(self.ffn_mult * self.d_model + 0.5)
        return -(-raw // self.ffn_multiple_of) * self.ffn_multiple_of

    @property
    def hidden_matrix_sides(self) -> tuple[int, ...]:
        """The distinct sides of the hidden weight matrices: the residual width, the query and key/value widths, and
        the feed-forward hidden width."""
        head = self.resolved_head_dim
        return tuple(sorted({self.d_model, self.n_heads * head, self.resolved_kv_heads * head, self.ffn_hidden}))


@dataclass(kw_only=True, slots=True, frozen=True)
class ParamConfig:
    """How hyperparameters scale with the model's shape relative to a base (proxy) shape."""

    name: Parametrization = "mup"
    base_width: int | None = None  # None = the model's own width (m = 1)
    base_depth: int | None = None  # None = the model's own depth (m_L = 1)
    base_head_dim: int | None = None  # attention scale equals SP's at this head dim; None = the model's head dim
    init_std: float = 0.02  # σ at the base shape
    embedding_mult: float = 1.0  # input multiplier on the embedding output (Cerebras uses 10)
    output_mult: float = 1.0  # α_out: logits are multiplied by output_mult / m
    zero_readout: bool = False  # zero-init the readout (and router), as μP coord checks recommend

    @property
    def scales_width(self) -> bool:
        """Whether the parametrization scales anything with width relative to the base shape (every one but SP)."""
        return self.name != "sp"

    def base_shape(self, model: ModelConfig) -> tuple[int, int]:
        """(base width, base depth): the proxy the model scales up from; unset, the model's own shape (m = 1)."""
        return self.base_width or model.d_model, self.base_depth or model.n_layers

    def __post_init__(self) -> None:
        for name in ("base_width", "base_depth", "base_head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}")
        if self.init_std <= 0:
            raise ConfigError("init_std", f"must be > 0, got {self.init_std}")


@dataclass(kw_only=True, slots=True, frozen=True)
class DataConfig:
    # Files, globs or folders: plain text (a file is a document), JSONL / .jsonl.gz / .jsonl.zst, Parquet and Arrow
    # IPC files (a record or row is a document), a `datasets` save_to_disk folder or a folder of Parquet shards.
    # Empty = the built-in corpus: the Python standard library source of the running interpreter.
    sources: list[str] = field(default_factory=list)
    text_field: str = "text"  # the JSONL field / Parquet or Arrow column that holds a document's text
    # Documents held out for validation, chosen by position before tokenization: the first, then every
    # 1/fraction-th. 0 with no validation_sources = no validation split (decisions then use training loss).
    validation_fraction: float = 0.005
    validation_sources: list[str] = field(default_factory=list)  # separate validation files; replace the fraction
    tokenizer: str | None = None  # a Hugging Face tokenizer folder; None = train a byte-level BPE on the corpus
    vocab_size: int = 4096  # size of the BPE trained when `tokenizer` is None
    tokenizer_sample_bytes: int = 64_000_000  # the BPE trains on the first this-many bytes of training documents
    max_bytes: int | None = 8_000_000  # read at most this much text (the built-in corpus is ~30 MB)
    cache_dir: str = ".cache/rung/data"
    shard_tokens: int = 1 << 24  # tokens per shard file

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ConfigError("vocab_size", f"must be >= 260 (256 bytes + specials), got {self.vocab_size}")
        for name in ("max_bytes", "tokenizer_sample_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1{' or null' if name == 'max_bytes' else ''}, got {value}")
        if self.shard_tokens < 1:
            raise ConfigError("shard_tokens", f"must be >= 1, got {self.shard_tokens}")
        if not math.isfinite(self.validation_fraction) or not 0 <= self.validation_fraction <= 0.5:
            raise ConfigError("validation_fraction", f"must be in [0, 0.5], got {self.validation_fraction}")
        if not self.text_field:
            raise ConfigError("text_field", "must name a field")

    @property
    def has_validation(self) -> bool:
        return bool(self.validation_sources) or self.validation_fraction > 0


@dataclass(kw_only=True, slots=True, frozen=True)
class TrainConfig:
    steps: int = 200
    seq_len: int = 128
    global_batch: int = 16  # sequences per optimizer step, whatever the number of workers
    micro_batch: int = 8  # sequences per worker per forward pass
    lr: float = 3e-3  # η at the base shape; every group's LR is a multiple of it
    weight_decay: float = 0.0  # λ at the base shape
    adam_eps: float = 1e-8  # ε at the base shape
    betas: tuple[float, float] = (0.9, 0.95)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    min_lr_ratio: float = 0.1  # the schedule ends at this fraction of each group's LR
    grad_clip: float = 1.0  # 0 = off
    zero_stage: Literal[0, 1, 2, 3] = 0
    dtype: DType = "float32"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # steps between validation-loss evaluations (0 = only the final one, which always runs)
    eval_batches: int = 4  # global batches of the validation split per evaluation (fewer if the split is smaller)
    workers: int = 1  # data-parallel worker processes (Ray Train workers when > 1 or on a cluster)
    use_gpu: bool = False  # one GPU per worker
    expert_parallel: int = 1  # MoE: workers per expert-parallel group, each holding n_experts / expert_parallel
    checkpoint_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 3  # newest checkpoints kept; 0 = write none (sweeps)
    # Also keep committed checkpoints at this URI (s3://, gs://, hdfs://, file://: anything pyarrow.fs opens);
    # --resume takes the newest verified one from here or from the run directory.
    checkpoint_uri: str | None = None
    max_failures: int = 0  # worker-group restarts from the last checkpoint before the run fails (-1 = forever)
    metrics_port: int | None = None  # Prometheus exposition on metrics_port + local rank; None = off
    peak_flops: float | None = None  # per worker, for MFU; None = known GPU table, or a measured CPU matmul rate
    max_loss: float | None = None  # stop as diverged when the loss exceeds this after warmup
    # Recompute activations in backward instead of keeping them: "full" keeps each block's input only, "selective"
    # keeps attention outputs and recomputes the FFN / MoE layer; same losses, less memory, more compute
    activation_checkpointing: Recompute = "none"
    # torch.compile each transformer block (regional, as torchtitan does): dense models at ZeRO 0-2
    compile: bool = False
    # ZeRO-3 CPU offload: "optimizer" keeps AdamW's state and step in host memory, "all" the parameters as well
    offload: Literal["none", "optimizer", "all"] = "none"
    # adamw everywhere, or muon / shampoo / soap / kfac for the hidden matrices — torch's Muon (orthogonalized
    # momentum), rung's Shampoo (Kronecker-factored preconditioner), SOAP (Adam in Shampoo's eigenbasis; its ε is
    # adam_eps) or K-FAC (Kronecker-factored Fisher of each linear layer) — with AdamW for the embedding, norms,
    # readout and router (rung/jobs/train/optimizers.py); each with its parametrization rule
    optimizer: Optimizer = "adamw"
    muon_momentum: float | None = None  # Muon's (Nesterov) momentum; None: 0.95; muon only
    # at the base shape: Shampoo's ε on each factor's diagonal (None: 1e-3), K-FAC's Tikhonov ρ split between its
    # two factors (None: 1e-2); shampoo and kfac only
    damping: float | None = None
    precondition_every: int | None = None  # steps between preconditioner refreshes; None: 10; shampoo, soap, kfac
    # SOAP's block: each hidden matrix is preconditioned as independent block × block tiles (it must divide every
    # hidden matrix's sides), which makes AdamW's μP width rule exact (rung/jobs/params/parametrization.py);
    # None: whole matrices, as SOAP's paper runs it; soap only
    precondition_block: int | None = None
    # LayerDrop: each step trains a random subset of whole layers, each dropped with this probability (reached at
    # the end of the LR warmup), the same on every worker, so depth cuts serve (rung/jobs/train/layerdrop.py); 0 = off
    layerdrop: float = 0.0

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "global_batch", "micro_batch", "log_every", "workers",
                     "expert_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.global_batch % self.micro_batch:
            raise ConfigError("global_batch", f"{self.global_batch} is not a multiple of micro_batch ({self.micro_batch})")
        for name in ("lr", "weight_decay", "adam_eps", "decay_fraction", "min_lr_ratio", "grad_clip", "max_loss",
                     "peak_flops"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(name, f"must be a finite number, got {value}")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise ConfigError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps and self.steps > 1:
            raise ConfigError("warmup_steps", f"must be in [0, steps), got {self.warmup_steps}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError("decay_fraction", f"must be in (0, 1], got {self.decay_fraction}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.eval_batches < 1:
            raise ConfigError("eval_batches", f"must be >= 1, got {self.eval_batches}")
        for name in ("grad_clip", "weight_decay", "checkpoint_every", "keep_checkpoints", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.layerdrop < 1:
            raise ConfigError("layerdrop", f"must be in [0, 1): a layer's drop probability, got {self.layerdrop}")
        if self.adam_eps <= 0:
            raise ConfigError("adam_eps", f"must be > 0, got {self.adam_eps}")
        for name, owners in (("muon_momentum", ("muon",)), ("damping", ("shampoo", "kfac")),
                             ("precondition_every", ("shampoo", "soap", "kfac")),
                             ("precondition_block", ("soap",))):
            if getattr(self, name) is not None and self.optimizer not in owners:
                raise ConfigError(name, f"belongs to {' and '.join(owners)}; train.optimizer is {self.optimizer}")
        if self.muon_momentum is not None and not 0 <= self.muon_momentum < 1:
            raise ConfigError("muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        if self.damping is not None and not (math.isfinite(self.damping) and self.damping > 0):
            raise ConfigError("damping", f"must be a finite number > 0, got {self.damping}")
        for name in ("precondition_every", "precondition_block"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")


OPTIMIZER_FIELDS = ("optimizer", "muon_momentum", "damping", "precondition_every",  # what a tuned LR was tuned with
                    "precondition_block")


def optimizer_settings(train: TrainConfig) -> dict[str, object]:
    """The optimizer and its own hyperparameters as `--set` fields: sweeps record them, transfer carries them."""
    return {f"train.{name}": getattr(train, name) for name in OPTIMIZER_FIELDS}


@dataclass(kw_only=True, slots=True, frozen=True)
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"  # the run directory is out_dir/name
    model: ModelConfig = field(default_factory=ModelConfig)
    param: ParamConfig = field(default_factory=ParamConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not self.name or self.name in (".", "..") or any(sep in self.name for sep in ("/", "\\", "\0")):
            raise ConfigError("name", f"{self.name!r} must be one directory name (no '/', not '.' or '..'): the run "
                              "directory is out_dir/name and nothing is written outside out_dir")
        width_aware = self.param.scales_width
        if width_aware and self.param.base_width is not None and self.param.base_width > self.model.d_model:
            raise ConfigError("param.base_width", f"{self.param.base_width} is larger than model.d_model "
                              f"({self.model.d_model}); the base shape is the small proxy the model scales up from")
        if width_aware and self.param.base_depth is not None and self.param.base_depth > self.model.n_layers:
            raise ConfigError("param.base_depth", f"{self.param.base_depth} is larger than model.n_layers "
                              f"({self.model.n_layers}); the base shape is the small proxy the model scales up from")
        ep = self.train.expert_parallel
        if ep > 1 and self.model.moe is None:
            raise ConfigError("train.expert_parallel", "expert parallelism needs an MoE model (model.moe)")
        if ep > 1 and self.model.moe.n_experts % ep:
            raise ConfigError("train.expert_parallel", f"{ep} does not divide model.moe.n_experts "
                              f"({self.model.moe.n_experts})")
        if self.train.workers % ep:
            raise ConfigError("train.expert_parallel", f"{ep} does not divide train.workers ({self.train.workers})")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError("train.seq_len", f"{self.train.seq_len} exceeds model.max_seq_len ({self.model.max_seq_len})")
        block = self.train.precondition_block
        sides = self.model.hidden_matrix_sides
        if block is not None and any(side % block for side in sides):
            raise ConfigError("train.precondition_block", f"{block} does not divide every hidden matrix's sides "
                              f"({', '.join(map(str, sides))} at model.d_model={self.model.d_model})")
        if self.data.tokenizer is None and self.data.vocab_size > self.model.vocab_size:
            raise ConfigError("model.vocab_size", f"{self.model.vocab_size} is smaller than the tokenizer's "
                              f"vocabulary (data.vocab_size = {self.data.vocab_size})")


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """Paths resolved against this process's directory: Ray workers run elsewhere."""
    data = cfg.data
    return evolve(cfg, {"out_dir": os.path.abspath(cfg.out_dir), "data.cache_dir": os.path.abspath(data.cache_dir),
                        "data.sources": [_absolute(source) for source in data.sources],
                        "data.validation_sources": [_absolute(source) for source in data.validation_sources],
                        "data.tokenizer": os.path.abspath(data.tokenizer) if data.tokenizer is not None else None})


def _absolute(source: str) -> str:
    """A source that exists (or a glob) resolved against this directory; one that names nothing here stays as
    written, so the error that refuses it (not found, or a hub id) names what the user wrote."""
    return os.path.abspath(source) if os.path.exists(source) or glob.has_magic(source) else source
