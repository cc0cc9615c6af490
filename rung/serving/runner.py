"""The model runner: turns a step plan into one packed forward pass over the paged KV cache and returns a token
for every span that reached its request's end. It sees token ids, positions, block tables and sampling inputs —
never request status, queues or stop rules.

A step is prepared (index tensors, sampling rows) and executed separately, so that under async scheduling the next
step is prepared while this one computes; its PENDING tokens are filled in between.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from rung.serving.model import InferenceModel, StepInputs
from rung.serving.sampling import Sample, SampleInput, Sampler
from rung.serving.scheduler import PENDING, StepPlan


@dataclass
class PreparedStep:
    inputs: StepInputs
    sample_rows: list[int]  # the row of each span that samples: its last token
    sample_inputs: list[SampleInput]
    pending: dict[str, int]  # request id -> the row holding its PENDING token (filled in before the step runs)


class ModelRunner:
    def __init__(self, model: InferenceModel, num_blocks: int, block_size: int, dtype: torch.dtype = torch.float32,
                 nano_batches: int = 1, deterministic: bool = False):
        spec = model.spec
        self.model, self.block_size = model, block_size
        self.nano_batches = nano_batches
        # batch-invariant: every request's rows go through their own GEMMs (one nano-batch per span, one logits
        # row at a time), so no other request in the step can change its numerics
        self.deterministic = deterministic
        self.sampler = Sampler()
        # [layers, key|value, kv heads, slots x head dim]; a block is block_size consecutive slots. The model
        # views keys as [head dim, slots] and values as [slots, head dim] per head, the layouts its two matrix
        # products read, so a request in consecutive blocks attends over views of the pool
        self.cache = torch.zeros(spec.num_layers, 2, spec.num_kv_heads, num_blocks * block_size * spec.head_dim,
                                 dtype=dtype, device=model.device)

    def _runs(self, block_table: tuple[int, ...], stop: int) -> list[slice]:
        """Where tokens 0..stop-1 of a request sit in the pool's slots, as runs of consecutive slots: one run when
        the KV manager kept its blocks consecutive, one more for a cached prefix shared with others."""
        runs, size, covered = [], self.block_size, 0
        start = previous = block_table[0]
        if block_table == tuple(range(start, start + len(block_table))):
            return [slice(start * size, start * size + stop)]
        for block in [*block_table[1:], None]:
            if block is None or block != previous + 1:
                length = min((previous + 1 - start) * size, stop - covered)
                if length > 0:
                    runs.append(slice(start * size, start * size + length))
                    covered += length
                start = block
            previous = block
        return runs

    @staticmethod
    def _slots(runs: list[slice], start: int, stop: int) -> list[int]:
        """The slots of tokens start..stop-1."""
        pieces, offset = [], 0
        for run in runs:
            low, high = max(start, offset), min(stop, offset + run.stop - run.start)
            if low < high:
                pieces.extend(range(run.start + low - offset, run.start + high - offset))
            offset += run.stop - run.start
        return pieces

    def prepare(self, plan: StepPlan) -> PreparedStep:
        """Plain Python lists first and one tensor each at the end: a decode step has one token per request, and a
        tensor per request would cost more than the lists."""
        token_ids, positions, slots, spans, first = [], [], [], [], 0
        rows, inputs, pending = [], [], {}
        for span in plan.spans:
            end = span.start + span.num_tokens
            runs = self._runs(span.block_table, end)
            token_ids.extend(span.token_ids)
            positions.extend(range(span.start, end))
            slots.extend(self._slots(runs, span.start, end))
            spans.append((first, span.num_tokens, runs))
            first += span.num_tokens
            if span.token_ids[-1] == PENDING:
                pending[span.request_id] = first - 1
                token_ids[-1] = 0
            if span.samples:
                rows.append(first - 1)
                inputs.append(SampleInput(span.request_id, span.params, span.history[:span.num_prompt_tokens],
                                          span.history[span.num_prompt_tokens:]))
        step = StepInputs(token_ids=torch.tensor(token_ids, dtype=torch.long), positions=torch.tensor(positions),
                          slots=torch.tensor(slots), spans=spans, read_in_place=not self.deterministic
                          ).to(self.model.device)
        if self.model.use_kernels:
            step.decodes  # noqa: B018 - built now, while (under async scheduling) the step before computes
        return PreparedStep(step, rows, inputs, pending)

    @staticmethod
    def fill(step: PreparedStep, samples: dict[str, Sample]) -> None:
        """Put the tokens the previous step sampled in place of the PENDING ones, in the inputs and in what the
        penalties see."""
        if not step.pending:
            return
        token_ids = step.inputs.token_ids
        token_ids[list(step.pending.values())] = torch.tensor([samples[r].token_id for r in step.pending],
                                                              device=token_ids.device)
        for index, row in enumerate(step.sample_inputs):
            if row.request_id in step.pending and row.params.penalised:
                step.sample_inputs[index] = replace(row, output_token_ids=(*row.output_token_ids,
                                                                           samples[row.request_id].token_id))

    def execute(self, step: PreparedStep) -> dict[str, Sample]:
        """A sampled token (with logprobs, when asked) for every span that reached its request's end."""
        parts = len(step.inputs.spans) if self.deterministic else self.nano_batches
        hidden = self.model.forward(step.inputs, self.cache, parts)
        rows = step.sample_rows
        if not rows:
            return {}
        logits = torch.cat([self.model.logits(hidden[[row]]) for row in rows]) if self.deterministic else \
            self.model.logits(hidden[rows])
        samples = self.sampler.sample(logits.cpu(), step.sample_inputs)  # generators and penalties live on the CPU
        return {row.request_id: sample for row, sample in zip(step.sample_inputs, samples)}

    def run(self, plan: StepPlan) -> dict[str, Sample]:
        return self.execute(self.prepare(plan)) if plan.spans else {}

    def release(self, request_id: str) -> None:
        """Forget a finished request's sampling state (its random stream)."""
        self.sampler.release(request_id)
