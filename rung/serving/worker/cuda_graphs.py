"""CUDA graphs for decode steps: a decode step of a small batch is a few hundred short kernel launches whose launch
overhead, not the GPU, sets the step time. Each is captured once at start-up, per batch size — 1, 2, 4, 8, then every
16 up to max_num_seqs — over static input buffers, and replayed for every decode step of that size or less: the step's
inputs are copied into the buffers, the rows past the batch are padding, and one replay runs the whole forward.

Padding rows compute a token that is thrown away: they read token 0 at position 0, write their keys and values to the
pool's first padding slot (never part of a block) and attend over that slot alone, so they touch no request's cache.
Prefill and mixed steps, batches above the largest size and contexts of more runs than the buffers hold run eagerly.

Only the Triton compute path is captured: its kernels read every per-step value from tensors (`RunLayout`), where the
PyTorch path loops over spans in Python. MoE models run eagerly: their routing counts tokens per expert on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from rung.serving.worker.model import InferenceModel
from rung.serving.worker.step import RunLayout, StepInputs

# A graph capture: runs `forward` once under capture and returns (replay, output), replay() recomputing output in
# place from the static inputs' current values.
Capture = Callable[[Callable[[], torch.Tensor]], tuple[Callable[[], object], torch.Tensor]]


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8 and every 16 up to max_num_seqs, which is always one."""
    sizes = {size for size in (1, 2, 4, 8, *range(16, max_num_seqs, 16)) if size < max_num_seqs}
    return sorted(sizes | {max_num_seqs})


def padded_size(sizes: list[int], batch: int) -> int | None:
    """The smallest captured size that holds `batch` rows; None when the batch is larger than every graph."""
    return next((size for size in sizes if size >= batch), None)


def graphs_blocked(device: torch.device, ops_name: str, num_experts: int, enforce_eager: bool,
                   deterministic: bool, tensor_parallel_size: int = 1) -> str | None:
    """Why decode steps run eagerly on this engine, or None when they are captured."""
    if enforce_eager:
        return "--enforce-eager"
    if tensor_parallel_size > 1:
        return "tensor parallelism issues its collectives eagerly"
    if device.type != "cuda":
        return "not a CUDA device"
    if ops_name != "triton":
        return f"the {ops_name} compute path loops over requests in Python (graphs need --attention-backend triton)"
    if num_experts:
        return "MoE routing counts each expert's tokens on the host"
    if deterministic:
        return "deterministic mode runs each request on its own"
    return None


def cuda_graph_capture() -> Capture:
    """Capture into CUDA graphs that share one memory pool (the largest captured first, the others reuse it)."""
    pool = torch.cuda.graph_pool_handle()

    def capture(forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], object], torch.Tensor]:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = forward()
        return graph.replay, out

    return capture


class DecodeGraphs:
    """Static input buffers for the largest decode batch, and one captured forward per size reading a prefix of
    them."""

    def __init__(self, model: InferenceModel, cache: torch.Tensor, max_num_seqs: int, max_runs: int,
                 pad_slot: int, capture: Capture):
        device = model.device
        self.sizes = capture_sizes(max_num_seqs)
        largest, self.pad_slot, self.pad_run = self.sizes[-1], pad_slot, max_runs
        self.token_ids = torch.zeros(largest, dtype=torch.long, device=device)
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slots = torch.zeros(largest, dtype=torch.long, device=device)
        int32 = dict(dtype=torch.int32, device=device)
        # runs 0..max_runs-1 hold the step's; run max_runs is the padding rows' single slot
        self.layout = RunLayout(run_starts=torch.full((max_runs + 1,), pad_slot, **int32),
                                run_lengths=torch.ones(max_runs + 1, **int32), first_run=torch.zeros(largest, **int32),
                                last_run=torch.zeros(largest, **int32), visible=torch.zeros(largest, **int32))
        self._pad(0, largest)
        self.graphs: dict[int, tuple[Callable[[], object], torch.Tensor]] = {}
        for size in reversed(self.sizes):
            step = self._static_step(size)
            forward = lambda step=step: model.forward(step, cache)  # noqa: E731
            forward()  # compiles the kernels and settles the allocator before capture
            self.graphs[size] = capture(forward)

    def _static_step(self, size: int) -> StepInputs:
        layout = self.layout
        return StepInputs(self.token_ids[:size], self.positions[:size], self.slots[:size], spans=[],
                          layout=RunLayout(layout.run_starts, layout.run_lengths, layout.first_run[:size],
                                           layout.last_run[:size], layout.visible[:size]))

    def _pad(self, start: int, stop: int) -> None:
        """Rows start..stop-1 become padding."""
        self.token_ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slots[start:stop] = self.pad_slot
        self.layout.first_run[start:stop] = self.pad_run
        self.layout.last_run[start:stop] = self.pad_run + 1
        self.layout.visible[start:stop] = 1

    def takes(self, step: StepInputs) -> bool:
        """Whether a graph can run the step: a decode of no more rows than the largest graph, and no more runs of
        slots than the static layout holds."""
        if not step.is_decode or padded_size(self.sizes, len(step.token_ids)) is None:
            return False
        return len(step.run_layout().run_starts) <= self.pad_run

    def run(self, step: StepInputs) -> torch.Tensor | None:
        """The step's final hidden states by replaying the graph of the smallest size that holds it, or None when
        the step is not one a graph can run (the caller runs it eagerly)."""
        if not self.takes(step):
            return None
        batch = len(step.token_ids)
        size = padded_size(self.sizes, batch)
        layout = step.run_layout()
        runs = len(layout.run_starts)
        self.token_ids[:batch] = step.token_ids
        self.positions[:batch] = step.positions
        self.slots[:batch] = step.slots
        static = self.layout
        static.run_starts[:runs] = layout.run_starts
        static.run_lengths[:runs] = layout.run_lengths
        static.first_run[:batch] = layout.first_run
        static.last_run[:batch] = layout.last_run
        static.visible[:batch] = layout.visible
        self._pad(batch, size)
        replay, out = self.graphs[size]
        replay()
        return out[:batch]
