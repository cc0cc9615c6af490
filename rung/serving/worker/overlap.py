"""NanoFlow's intra-layer overlap on CUDA: one nano-batch's attention on one stream while another's MLP GEMMs run on
a second, ordered by per-part events (part i's attention at layer l waits only for its own MLP at layer l-1, so it
overlaps part i-1's MLP at layer l)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from rung.serving.worker.step import StepInputs

# (x rows, layer, the part's step, rope tables) -> the part's new rows; and (x rows, layer) -> new rows
AttentionBlock = Callable[[torch.Tensor, int, StepInputs, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
MLPBlock = Callable[[torch.Tensor, int], torch.Tensor]


class StreamOverlap:
    """The two CUDA streams of one model, made on first use."""

    def __init__(self) -> None:
        self._streams: tuple[torch.cuda.Stream, torch.cuda.Stream] | None = None

    def run(self, x: torch.Tensor, parts: list[tuple[slice, StepInputs]], num_layers: int, cos: torch.Tensor,
            sin: torch.Tensor, attention_block: AttentionBlock, mlp_block: MLPBlock) -> None:
        """Every layer of every part, updating x in place."""
        if self._streams is None:
            self._streams = (torch.cuda.Stream(x.device), torch.cuda.Stream(x.device))
        attention, mlp = self._streams
        for stream in (attention, mlp):
            stream.wait_stream(torch.cuda.current_stream(x.device))
        mlp_done: list[torch.cuda.Event | None] = [None] * len(parts)
        for layer in range(num_layers):
            for index, (rows, sub) in enumerate(parts):
                if mlp_done[index] is not None:
                    attention.wait_event(mlp_done[index])
                with torch.cuda.stream(attention):
                    x[rows] = attention_block(x[rows], layer, sub, (cos[rows], sin[rows]))
                    attended = torch.cuda.Event()
                    attended.record(attention)
                mlp.wait_event(attended)
                with torch.cuda.stream(mlp):
                    x[rows] = mlp_block(x[rows], layer)
                    mlp_done[index] = torch.cuda.Event()
                    mlp_done[index].record(mlp)
        torch.cuda.current_stream(x.device).wait_stream(mlp)
