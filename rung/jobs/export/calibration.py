"""The validation split of the run an exported folder came from (its `rung_export.json`), as token ids: text the
model never trained on, from its own distribution — `rung quantize`'s default calibration data. Here on the jobs
side because only training knows where a run's data lives; the CLI hands the ids to serving's quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from rung.errors import RungError
from rung.jobs.export.hf_folder import PROVENANCE


def validation_ids(model_dir: str | Path, max_tokens: int) -> torch.Tensor:
    """At most `max_tokens` ids of the exporting run's validation split, in order; a RungError when the folder has
    no provenance or its run is not on this machine."""
    from rung.jobs.data.prepare import prepare_data
    from rung.jobs.data.shards import load_shards
    from rung.jobs.loading import load_run_config
    from rung.jobs.run_dir import RunDir

    provenance = Path(model_dir) / PROVENANCE
    if not provenance.is_file():
        raise RungError(f"--calibration is needed: {model_dir} has no {PROVENANCE} (it was not exported by rung), so "
                        "there is no run whose validation split could calibrate it")
    run = RunDir(Path(json.loads(provenance.read_text())["run_dir"]))
    if not run.config.is_file():
        raise RungError(f"--calibration is needed: the run {run.root} this folder came from is not on this machine")
    data = prepare_data(load_run_config(str(run.config)), log=lambda *_: None)
    shards = load_shards(data, "validation")
    if not shards:
        raise RungError(f"--calibration is needed: the run {run.root} has no validation split")
    return torch.from_numpy(np.concatenate(shards)[:max_tokens].astype(np.int64))
