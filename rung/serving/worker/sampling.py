"""Sampling: the sampler that turns a step's logits into tokens (the parameters a request may set live in
`core/params.py`).

Order of operations, as in vLLM: a structured output's token mask (`grammar.py`), the request's logit bias added to
the raw logits, then penalties (repetition over prompt and output, presence and frequency over the output), then
temperature, top-k, top-p and min-p, then a draw from each request's own seeded generator (one uniform number a
token, `draw`) — so a seeded request samples the same tokens whatever else shares its batch. Returned logprobs are
those of the model's distribution before any processing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rung.serving.core.outputs import Sample
from rung.serving.core.params import SamplingParams


@dataclass
class SampleInput:
    """One request's row of a step: its parameters and the tokens the penalties look at."""

    request_id: str
    params: SamplingParams
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, row: SampleInput) -> torch.Generator:
        generator = self._generators.get(row.request_id)
        if generator is None:
            generator = torch.Generator()
            if row.params.seed is not None:
                generator.manual_seed(row.params.seed)
            else:
                generator.seed()
            self._generators[row.request_id] = generator
        return generator

    def sample(self, logits: torch.Tensor, rows: list[SampleInput],
               masks: tuple[list[int], torch.Tensor] | None = None) -> list[Sample]:
        """logits: [len(rows), vocab] fp32. `masks`: the structured rows' indices and their grammar masks (0 / -inf,
        `grammar.additive`), added before anything else. Plain greedy rows (no bias or penalties) take one batched
        argmax; the others are processed row by row. Log-probabilities are computed for the rows that asked for
        them only: for 64 rows of 8k logits, a log-softmax of all costs as much as the greedy pick.

        On a GPU, a step of plain greedy rows is picked there, and only the ids come back (one small device-to-host
        copy); a step with any other row moves its logits to the host, where generators, penalties and grammar
        masks live."""
        if masks is not None or any(not row.params.greedy or row.params.processed or row.params.logprobs is not None
                                    for row in rows):
            logits = logits.cpu()
        model_logits = logits  # what returned logprobs are computed from
        if masks is not None:
            indices, additive = masks
            logits = logits + additive if indices == list(range(len(rows))) else \
                logits.index_add(0, torch.tensor(indices), additive)
        greedy = logits.max(dim=-1).indices.tolist()  # the first maximum, as argmax, at a third of its cost
        tokens, drawn, scores = [], [], []
        for index, row in enumerate(rows):
            p = row.params
            if p.greedy and not p.processed:
                tokens.append(greedy[index])
                continue
            processed = processed_logits(logits[index], row)
            if p.greedy:
                tokens.append(int(processed.argmax()))
            else:  # drawn below, with the step's other sampled rows
                tokens.append(-1)
                drawn.append(index)
                scores.append(processed)
        if drawn:
            chosen = draw(torch.softmax(torch.stack(scores), dim=-1), [self._generator(rows[i]) for i in drawn])
            for index, token in zip(drawn, chosen):
                tokens[index] = token
        wanted = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
        logprobs, chosen = {}, {}
        if wanted:
            table = torch.log_softmax(model_logits[wanted], dim=-1)
            picked = table.gather(1, torch.tensor([tokens[i] for i in wanted])[:, None])[:, 0].tolist()
            logprobs, chosen = dict(zip(wanted, table)), dict(zip(wanted, picked))
        samples = []
        for index, (row, token) in enumerate(zip(rows, tokens)):
            top = {}
            if row.params.logprobs:
                values, ids = logprobs[index].topk(row.params.logprobs)
                top = dict(zip(ids.tolist(), values.tolist()))
            samples.append(Sample(token, chosen.get(index), top))
        return samples


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """One token per row of probs [rows, vocab], by inverse transform: one uniform number from the row's own
    generator, placed on the row's cumulative distribution. torch.multinomial draws an exponential per vocabulary
    entry instead, 0.35 ms a row for 16k tokens on this project's CPU — a sixth of a busy decode step."""
    cdf = probs.cumsum(dim=-1)
    targets = torch.cat([torch.rand(1, generator=generator) for generator in generators]) * cdf[:, -1]
    tokens = torch.searchsorted(cdf, targets[:, None], right=True)[:, 0].clamp_(max=probs.shape[-1] - 1).tolist()
    for row, token in enumerate(tokens):
        if probs[row, token] == 0:  # rounding put the target past the last token with any mass: that token
            tokens[row] = int(probs[row].nonzero()[-1])
    return tokens


def processed_logits(logits: torch.Tensor, row: SampleInput) -> torch.Tensor:
    """One row's logits after the logit bias, penalties, temperature, top-k, top-p and min-p (-inf where
    excluded)."""
    p = row.params
    scores = logits.clone()
    if p.logit_bias:
        tokens, biases = zip(*p.logit_bias)
        scores[list(tokens)] += torch.tensor(biases, dtype=scores.dtype)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
        if seen.numel():
            picked = scores[seen]
            scores[seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
        counts = torch.bincount(torch.tensor(row.output_token_ids), minlength=scores.numel()).float()
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).float()
    if p.greedy:
        return scores
    scores = scores / p.temperature
    if p.top_k > 0 and p.top_k < scores.numel():
        threshold = scores.topk(p.top_k).values[-1]
        scores = scores.masked_fill(scores < threshold, float("-inf"))
    if p.top_p < 1.0:
        ordered, order = scores.sort(descending=True)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) >= p.top_p  # keep the smallest set reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return scores
