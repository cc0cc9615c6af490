"""Reading a safetensors file that may be damaged: checksums prove the bytes are the ones written, not that the
writer wrote a valid file, so every reader of weights (resume, export, serving) refuses a bad file the same way."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from rung.errors import RungError


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, or a RungError naming the file and what is wrong with it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:  # a truncated or garbled header, a short file
        reason = " ".join(str(err).split())
        raise RungError(f"{path} is not a readable safetensors file: {reason}"[:400]) from None
