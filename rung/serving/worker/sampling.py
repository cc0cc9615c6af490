"""Sampling: the sampler that turns a step's logits into tokens (the parameters a request may set live in
`core/params.py`), on the device the logits are on.

Order of operations, as in vLLM: a structured output's token mask (`grammar.py`), the request's logit bias added to
the raw logits, then penalties (repetition over prompt and output, presence and frequency over the output), then
temperature, top-k, top-p and min-p, then a draw from each request's own seeded generator (one uniform number a
token, `draw`) — so a seeded request samples the same tokens whatever else shares its batch. Returned logprobs are
those of the model's distribution before any processing.

Every stage is batched over the rows that need it, with each row's parameters as a column of values, so on a GPU no
stage waits for the host: the sampled ids (and the logprobs asked for) come back in one copy at the end of the step.
"""

from __future__ import annotations

import collections
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
    def __init__(self, device: torch.device = torch.device("cpu")) -> None:
        self.device = device  # where the requests' generators draw: the logits' device
        self._generators: dict[str, torch.Generator] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)

    def _generator(self, row: SampleInput) -> torch.Generator:
        generator = self._generators.get(row.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
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
        argmax; the others go through `processed` together. Log-probabilities are computed for the rows that asked
        for them only: for 64 rows of 8k logits, a log-softmax of all costs as much as the greedy pick."""
        device = logits.device
        model_logits = logits  # what returned logprobs are computed from
        if masks is not None:
            indices, additive = masks
            additive = additive.to(device, non_blocking=True)
            logits = logits + additive if indices == list(range(len(rows))) else \
                logits.index_add(0, torch.tensor(indices, device=device), additive)
        # on a CPU max's indices are the first maximum, as argmax's, at a third of its cost; CUDA promises it of argmax
        tokens = logits.max(dim=-1).indices if device.type == "cpu" else logits.argmax(dim=-1)
        slow = [index for index, row in enumerate(rows) if not row.params.greedy or row.params.processed]
        if slow:
            every = len(slow) == len(rows)  # the common case of one kind of request: no gathers
            scores = processed(logits if every else logits[slow], [rows[i] for i in slow])
            drawn = [j for j, i in enumerate(slow) if not rows[i].params.greedy]
            if len(drawn) < len(slow):  # greedy rows with penalties or a bias take the processed scores' argmax
                picked = scores.argmax(dim=-1)
            else:  # every row draws, in place of the plain argmax
                picked = tokens if every else tokens[slow]
            if drawn:
                probs = torch.softmax(scores if len(drawn) == len(slow) else scores[drawn], dim=-1)
                picked[drawn] = draw(probs, [self._generator(rows[slow[j]]) for j in drawn])
            if picked is not tokens:
                tokens[slow] = picked
        wanted = [index for index, row in enumerate(rows) if row.params.logprobs is not None]
        logprobs: dict[int, tuple[float, dict[int, float]]] = {}
        if wanted:
            table = torch.log_softmax(model_logits[wanted], dim=-1)
            chosen = table.gather(1, tokens[wanted][:, None])[:, 0]
            top = table.topk(max(1, *(rows[i].params.logprobs for i in wanted)), dim=-1)
            chosen, values, ids = chosen.tolist(), top.values.tolist(), top.indices.tolist()
            for j, index in enumerate(wanted):
                count = rows[index].params.logprobs
                logprobs[index] = chosen[j], dict(zip(ids[j][:count], values[j][:count]))
        return [Sample(token, *logprobs.get(index, (None, {}))) for index, token in enumerate(tokens.tolist())]


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """One token per row of probs [rows, vocab], by inverse transform: one uniform number from the row's own
    generator, placed on the row's cumulative distribution. torch.multinomial draws an exponential per vocabulary
    entry instead, 0.35 ms a row for 16k tokens on this project's CPU — a sixth of a busy decode step. A target that
    rounding puts at or past the total takes the last token with mass, where the cumulative first reaches the total
    (below the total, the first entry above the target always has mass: adding zero leaves a sum unchanged)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    targets = torch.cat([torch.rand(1, generator=generator, device=probs.device) for generator in generators])
    tokens = torch.searchsorted(cdf, targets[:, None] * total, right=True)
    return torch.where(tokens < probs.shape[-1], tokens, torch.searchsorted(cdf, total))[:, 0]


def _history(histories: list[dict[int, float]], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' token histories as [rows, width] token ids and values on the logits' device — a few entries a row, not
    a vocabulary's worth. A short row is padded with its own first token and value 0, so a scatter writes padding
    where its row's own entry writes the same, and a scatter-add adds nothing."""
    width = max(1, max(len(history) for history in histories))
    ids, values = [], []
    for history in histories:
        tokens = list(history) or [0]
        ids.append(tokens + [tokens[0]] * (width - len(tokens)))
        values.append(list(history.values()) + [0.0] * (width - len(history)))
    return (torch.tensor(ids, device=like.device),
            torch.tensor(values, dtype=like.dtype, device=like.device))


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """One value per row, as a column that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]


def processed(logits: torch.Tensor, rows: list[SampleInput]) -> torch.Tensor:
    """Rows' logits after the logit bias, penalties, and (for rows that sample) temperature, top-k, top-p and min-p
    (-inf where excluded). A stage runs only when some row asks for it, on all rows at once; a row that does not ask
    passes through it unchanged."""
    params = [row.params for row in rows]
    scores = logits.clone()
    device, vocab = scores.device, scores.shape[-1]
    bias = [(index, token, value) for index, p in enumerate(params) for token, value in p.logit_bias]
    if bias:
        index, token, value = zip(*bias)
        scores.index_put_((torch.tensor(index, device=device), torch.tensor(token, device=device)),
                          torch.tensor(value, dtype=scores.dtype, device=device), accumulate=True)
    if any(p.repetition_penalty != 1.0 for p in params):  # every token seen in the prompt or output, once
        ids, _ = _history([dict.fromkeys((*row.prompt_token_ids, *row.output_token_ids), 1.0)
                           if row.params.repetition_penalty != 1.0 else {} for row in rows], scores)
        penalty = _column([p.repetition_penalty for p in params], scores)  # 1 for a row without: a no-op
        picked = scores.gather(1, ids)  # a padding entry repeats a real one, and writes back what that one writes
        scores.scatter_(1, ids, torch.where(picked > 0, picked / penalty, picked * penalty))
    if any(p.presence_penalty or p.frequency_penalty for p in params):  # each output token by its count
        counts = [collections.Counter(row.output_token_ids) if row.params.penalised else {} for row in rows]
        ids, count = _history(counts, scores)
        penalty = (_column([p.frequency_penalty for p in params], scores) * count
                   + _column([p.presence_penalty for p in params], scores) * (count > 0))
        scores.scatter_add_(1, ids, -penalty)  # padding adds zero
    sampled = [not p.greedy for p in params]
    if not any(sampled):
        return scores
    scores = scores / _column([p.temperature if s else 1.0 for p, s in zip(params, sampled)], scores)
    top_k = [p.top_k if s and 0 < p.top_k < vocab else 0 for p, s in zip(params, sampled)]
    if any(top_k):
        kth = scores.topk(max(top_k), dim=-1).values.gather(
            1, torch.tensor([max(k, 1) - 1 for k in top_k], device=device)[:, None])
        scores = scores.masked_fill(torch.tensor(top_k, device=device)[:, None].bool() & (scores < kth),
                                    float("-inf"))
    top_p = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
    if any(value < 1.0 for value in top_p):
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = torch.softmax(ordered, dim=-1)
        threshold = _column(top_p, probs)
        drop = (probs.cumsum(dim=-1) - probs >= threshold) & (threshold < 1.0)  # keep the smallest set reaching top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))
    min_p = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]
    if any(min_p):
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < _column(min_p, probs) * probs.max(dim=-1, keepdim=True).values,
                                    float("-inf"))
    return scores
