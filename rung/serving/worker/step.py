"""What one forward pass computes, as the runner hands it to the model: the packed tokens of every span of a step,
their positions and cache slots, each span's context as runs of pool slots, and the nano-batch split."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

import torch


@dataclass
class DecodeBatch:
    """The step's single-token spans as the decode kernel reads them: their rows in the batch and their contexts
    as runs of pool slots (request r's runs are offsets[r]..offsets[r+1]-1)."""

    rows: torch.Tensor | slice  # a slice when they lead the batch, as the scheduler puts decodes first
    starts: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor


@dataclass
class PrefillBatch:
    """The step's spans of several tokens (prefill chunks) as the prefill kernel reads them: span s is rows
    firsts[s]..firsts[s]+counts[s]-1, the newest positions of a context of runs offsets[s]..offsets[s+1]-1."""

    firsts: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    offsets: torch.Tensor


def _contexts(spans: list[tuple[int, int, list[slice]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The spans' runs as the kernels read them: every run's first slot and length, and where each span's begin."""
    starts, lengths, offsets = [], [], [0]
    for _, _, runs in spans:
        starts.extend(run.start for run in runs)
        lengths.extend(run.stop - run.start for run in runs)
        offsets.append(len(starts))
    return torch.tensor(starts), torch.tensor(lengths), torch.tensor(offsets)


@dataclass
class RunLayout:
    """The step's contexts per query token, as the Triton kernels read them (int32, on the step's device): token t
    attends over runs first_run[t]..last_run[t]-1, run r being run_lengths[r] slots from run_starts[r], and sees the
    first visible[t] tokens of that context (its causal limit). Every value is a tensor, so a CUDA graph can replay
    a decode step from static copies of them (`cuda_graphs.py`)."""

    run_starts: torch.Tensor
    run_lengths: torch.Tensor
    first_run: torch.Tensor
    last_run: torch.Tensor
    visible: torch.Tensor

    @classmethod
    def of(cls, spans: list[tuple[int, int, list[slice]]], device: torch.device) -> RunLayout:
        starts, lengths, first, last, visible = [], [], [], [], []
        for _, rows, runs in spans:
            begin = len(starts)
            starts += [run.start for run in runs]
            lengths += [run.stop - run.start for run in runs]
            context = sum(run.stop - run.start for run in runs)
            first += [begin] * rows
            last += [len(starts)] * rows
            visible += range(context - rows + 1, context + 1)
        return cls(*(torch.tensor(values, dtype=torch.int32, device=device)
                     for values in (starts, lengths, first, last, visible)))


@dataclass
class StepInputs:
    """What one forward pass needs, built by the runner from a step plan."""

    token_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    slots: torch.Tensor  # [T] flat cache slot of each token
    # per request: (first row in the batch, rows, its whole context as runs of consecutive slots in the pool)
    spans: list[tuple[int, int, list[slice]]]
    # a decode reads a context of a few runs in place, one product per run; off, every context of several runs is
    # copied into one first, so a request's arithmetic never depends on where its blocks sit (deterministic mode)
    read_in_place: bool = True
    layout: RunLayout | None = None  # built on first use (`run_layout`), or given: a CUDA graph's static copy
    _nano_batches: dict[int, list[tuple[slice, StepInputs]]] = field(default_factory=dict, init=False, repr=False,
                                                                     compare=False)

    def run_layout(self) -> RunLayout:
        """The per-token layout, built once per step (or nano-batch) and read by every layer."""
        if self.layout is None:
            self.layout = RunLayout.of(self.spans, self.token_ids.device)
        return self.layout

    @property
    def is_decode(self) -> bool:
        """Every span is a single token: the steps CUDA graphs replay."""
        return len(self.spans) == len(self.token_ids)

    @cached_property
    def decodes(self) -> DecodeBatch | None:
        """Built once per step (not per layer) for the decode kernel; None when no span is a single token."""
        spans = [span for span in self.spans if span[1] == 1]
        if not spans:
            return None
        rows = [first for first, _, _ in spans]
        return DecodeBatch(slice(0, len(rows)) if rows[-1] == len(rows) - 1 else torch.tensor(rows),
                           *_contexts(spans))

    @cached_property
    def prefills(self) -> PrefillBatch | None:
        """Built once per step for the prefill kernel; None when every span is a single token."""
        spans = [span for span in self.spans if span[1] > 1]
        if not spans:
            return None
        return PrefillBatch(torch.tensor([first for first, _, _ in spans]),
                            torch.tensor([rows for _, rows, _ in spans]), *_contexts(spans))

    def to(self, device: torch.device) -> StepInputs:
        """The same step with its index tensors on `device` (runs are plain slices)."""
        return replace(self, token_ids=self.token_ids.to(device, non_blocking=True),
                       positions=self.positions.to(device, non_blocking=True),
                       slots=self.slots.to(device, non_blocking=True))

    def nano_batches(self, count: int) -> list[tuple[slice, StepInputs]]:
        """The step as up to `count` nano-batches (`split`), built once: the runner prepares the very parts the
        model then runs. One part is the step itself."""
        if count <= 1 or len(self.spans) <= 1:
            return [(slice(0, len(self.token_ids)), self)]
        if count not in self._nano_batches:
            self._nano_batches[count] = self.split(count)
        return self._nano_batches[count]

    def split(self, parts: int) -> list[tuple[slice, StepInputs]]:
        """Up to `parts` nano-batches of whole spans with about equal token counts, in span order (a span may read
        blocks an earlier span of the same step writes, so order is kept)."""
        total = len(self.token_ids)
        boundaries = [first + rows for first, rows, _ in self.spans[:-1]]  # where a cut may go
        cuts: list[int] = []
        for k in range(1, parts):
            later = [b for b in boundaries if not cuts or b > cuts[-1]]
            if later:
                cuts.append(min(later, key=lambda b: abs(b - total * k / parts)))
        bounds = [0, *sorted(set(cuts)), total]
        out = []
        for start, stop in zip(bounds, bounds[1:]):
            spans = [(first - start, rows, ctx) for first, rows, ctx in self.spans if start <= first < stop]
            out.append((slice(start, stop), StepInputs(self.token_ids[start:stop], self.positions[start:stop],
                                                       self.slots[start:stop], spans, self.read_in_place)))
        return out
