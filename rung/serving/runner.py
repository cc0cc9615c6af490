"""The model runner: turns a step plan into one packed forward pass over the paged KV cache and returns a token
for every span that reached its request's end. It sees token ids, positions, block tables and sampling inputs —
never request status, queues or stop rules.
"""

from __future__ import annotations

import torch

from rung.serving.model import InferenceModel, StepInputs
from rung.serving.sampling import Sample, SampleInput, Sampler
from rung.serving.scheduler import StepPlan


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
                                 dtype=dtype)

    def _context(self, block_table: tuple[int, ...], stop: int) -> slice | torch.Tensor:
        """Where tokens 0..stop-1 of a request sit in the pool's slots: a slice when its blocks are consecutive
        (the KV manager places them so), else every slot."""
        first = block_table[0]
        if tuple(block_table) == tuple(range(first, first + len(block_table))):
            return slice(first * self.block_size, first * self.block_size + stop)
        positions = torch.arange(stop)
        blocks = torch.tensor(block_table, dtype=torch.long)[positions // self.block_size]
        return blocks * self.block_size + positions % self.block_size

    def prepare(self, plan: StepPlan) -> StepInputs:
        token_ids, positions, slots, spans, first = [], [], [], [], 0
        for span in plan.spans:
            end = span.start + span.num_tokens
            context = self._context(span.block_table, end)
            token_ids.extend(span.token_ids)
            positions.append(torch.arange(span.start, end))
            slots.append(torch.arange(context.start + span.start, context.stop) if isinstance(context, slice)
                         else context[span.start:])
            spans.append((first, span.num_tokens, context))
            first += span.num_tokens
        return StepInputs(token_ids=torch.tensor(token_ids, dtype=torch.long), positions=torch.cat(positions),
                          slots=torch.cat(slots), spans=spans)

    def run(self, plan: StepPlan) -> dict[str, Sample]:
        """A sampled token (with logprobs) for every span that reached its request's end."""
        if not plan.spans:
            return {}
        step = self.prepare(plan)
        hidden = self.model.forward(step, self.cache, len(plan.spans) if self.deterministic else self.nano_batches)
        rows, inputs, end = [], [], 0
        for span in plan.spans:
            end += span.num_tokens
            if span.samples:
                rows.append(end - 1)
                inputs.append(SampleInput(span.request_id, span.params, span.history[:span.num_prompt_tokens],
                                          span.history[span.num_prompt_tokens:]))
        if not rows:
            return {}
        logits = torch.cat([self.model.logits(hidden[[row]]) for row in rows]) if self.deterministic else \
            self.model.logits(hidden[rows])
        samples = self.sampler.sample(logits, inputs)
        return {row.request_id: sample for row, sample in zip(inputs, samples)}

    def release(self, request_id: str) -> None:
        """Forget a finished request's sampling state (its random stream)."""
        self.sampler.release(request_id)
