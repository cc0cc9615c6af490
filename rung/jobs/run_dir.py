"""The run directory: where one training run keeps everything, and the one place its file names are written.

    out_dir/name/                      RunDir.of(cfg)
        config.yaml                    the resolved RunConfig the run trained with
        metrics.jsonl                  one row per optimizer step (the last write of a step wins, as after a restart);
                                       val_loss / val_perplexity at the steps that evaluate, else null
        transfer.json                  provenance of hyperparameters transferred from a sweep (`--hparams-from`)
        tokenizer.json                 the run's tokenizer, which export ships with the model
        workers/rank{r}.json           which process (and experts) each worker had, for operators
        ray/                           Ray Train's storage for a worker group
        checkpoints/step_NNNNNNNN/     committed checkpoints (rung.platform.checkpoint: manifest, staging, pruning)
            model.safetensors          consolidated fp32 weights (what export reads)
            optimizer.safetensors      AdamW moments
            state.json                 step, tokens, world size, the model shape and parametrization
            rng_rank{r}.safetensors    each worker's random state
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rung.jobs.data.shards import TOKENIZER_FILE

# inside a checkpoint directory
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.safetensors"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, cfg) -> RunDir:
        """The run directory of a RunConfig: out_dir/name."""
        return cls(Path(cfg.out_dir) / cfg.name)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def transfer(self) -> Path:
        return self.root / "transfer.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_FILE

    def worker(self, rank: int) -> Path:
        return self.root / "workers" / f"rank{rank}.json"

    @property
    def ray_storage(self) -> Path:
        return self.root / "ray"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"
