"""Named configs that ship inside the package, so `rung train tiny` works right after `pip install`: three that
train on a CPU (`tiny`, `tiny-moe`, `small`) and GPU-scale ones (`gpt-125m` … `llama-7b`, `moe-8x350m`) whose base
shape is `small`, the proxy their hyperparameters transfer from."""

from __future__ import annotations

from collections.abc import Callable

from rung.config import evolve
from rung.jobs.config import DataConfig, ModelConfig, MoEConfig, ParamConfig, RunConfig, TrainConfig


def tiny() -> RunConfig:
    """A 2-layer, 64-wide μP model that trains in well under a minute on one CPU core."""
    return RunConfig(
        name="tiny",
        model=ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, max_seq_len=128),
        param=ParamConfig(name="mup", base_width=64, base_depth=2),
        # 4 MB of the built-in corpus is ~300 files: 2 % holds out 7 of them for validation (0.5 % would be 2)
        data=DataConfig(vocab_size=2048, max_bytes=4_000_000, validation_fraction=0.02),
        train=TrainConfig(steps=200, seq_len=128, global_batch=16, micro_batch=8, lr=1e-2, warmup_steps=20),
    )


def tiny_moe() -> RunConfig:
    """The tiny model with 4 experts, top-2 routing and capacity factor 1.25."""
    return evolve(tiny(), {"name": "tiny-moe", "model.moe": MoEConfig(n_experts=4, top_k=2, capacity_factor=1.25)})


def small() -> RunConfig:
    """A 4-layer, 256-wide CompleteP model with its base shape at the tiny proxy (64 wide, 2 deep)."""
    return RunConfig(
        name="small",
        model=ModelConfig(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, max_seq_len=512),
        param=ParamConfig(name="completep", base_width=64, base_depth=2),
        data=DataConfig(vocab_size=8192, max_bytes=16_000_000, validation_fraction=0.02),
        train=TrainConfig(steps=1000, seq_len=256, global_batch=32, micro_batch=8, lr=1e-2, warmup_steps=50),
    )


def _gpu_scale(name: str, width: int, depth: int, heads: int, steps: int, micro_batch: int, zero_stage: int,
               vocab: int = 50304, ffn_mult: float = 8 / 3, ffn_multiple_of: int = 16, tied: bool = True,
               seq_len: int = 2048, moe: MoEConfig | None = None) -> RunConfig:
    """A GPU-scale model in bf16 whose CompleteP base shape is the `small` proxy (256 wide, 4 deep), so a sweep on
    this CPU-trainable proxy transfers to it; ~1M-token global batches and about Chinchilla's 20 tokens a
    parameter. Its data section is the built-in corpus: point `data.sources` at a real corpus."""
    return RunConfig(
        name=name,
        model=ModelConfig(vocab_size=vocab, d_model=width, n_layers=depth, n_heads=heads, ffn_mult=ffn_mult,
                          ffn_multiple_of=ffn_multiple_of, tie_embeddings=tied, max_seq_len=seq_len, moe=moe),
        param=ParamConfig(name="completep", base_width=256, base_depth=4),
        data=DataConfig(vocab_size=min(vocab, 32768), max_bytes=None),
        train=TrainConfig(steps=steps, seq_len=seq_len, global_batch=512 * 2048 // seq_len, micro_batch=micro_batch,
                          lr=1e-2, warmup_steps=min(2000, steps // 10), dtype="bfloat16", zero_stage=zero_stage,
                          use_gpu=True, activation_checkpointing="full" if zero_stage == 3 else "none",
                          checkpoint_every=1000),
    )


GPU_PRESETS: dict[str, Callable[[], RunConfig]] = {
    # GPT-3's small/medium/XL shapes with SwiGLU (8/3 x width, the same parameters as a 4x GELU MLP), tied embeddings
    "gpt-125m": lambda: _gpu_scale("gpt-125m", 768, 12, 12, steps=2_400, micro_batch=16, zero_stage=0),
    "gpt-350m": lambda: _gpu_scale("gpt-350m", 1024, 24, 16, steps=7_000, micro_batch=16, zero_stage=1),
    "gpt-1.3b": lambda: _gpu_scale("gpt-1.3b", 2048, 24, 16, steps=25_000, micro_batch=8, zero_stage=2),
    # Llama-2-7B's shape: 32 x 4096, head dim 128, MHA, FFN 11,008 (2.6875 x width, a multiple of 256), untied
    "llama-7b": lambda: _gpu_scale("llama-7b", 4096, 32, 32, steps=130_000, micro_batch=2, zero_stage=3,
                                   vocab=32000, ffn_mult=2.6875, ffn_multiple_of=256, tied=False, seq_len=4096),
    # the 350M shape with 8 experts, top-2 (ZeRO-3 cannot shard experts: ZeRO-2 with expert parallelism instead)
    "moe-8x350m": lambda: _gpu_scale("moe-8x350m", 1024, 24, 16, steps=7_000, micro_batch=8, zero_stage=2,
                                     moe=MoEConfig(n_experts=8, top_k=2, capacity_factor=1.25)),
}

PRESETS: dict[str, Callable[[], RunConfig]] = {"tiny": tiny, "tiny-moe": tiny_moe, "small": small, **GPU_PRESETS}
