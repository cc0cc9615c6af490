"""Sampling: empirical frequencies match the analytic distribution; seeds are reproducible; bad values are named."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from rung.serving.core.params import SamplingError, SamplingParams
from rung.serving.worker.sampling import SampleInput, Sampler, processed



def processed_logits(logits: torch.Tensor, row: SampleInput) -> torch.Tensor:
    """One row through the sampler's batched processing."""
    return processed(logits[None], [row])[0]


CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}  # chi-square quantiles at p = 0.999


def expected_distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Written out independently of the sampler: temperature, then top-k, top-p, min-p on probabilities."""
    probs = torch.softmax(logits / params.temperature, -1)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_k > 0:
        keep &= probs >= probs.topk(params.top_k).values[-1]
    order = probs.argsort(descending=True)
    mass = 0.0
    for token in order.tolist():
        if mass >= params.top_p:
            keep[token] = False
        mass += probs[token].item()
    if params.min_p:
        renorm = torch.where(keep, probs, 0) / torch.where(keep, probs, 0).sum()
        keep &= renorm >= params.min_p * renorm.max()
    out = torch.where(keep, probs, 0.0)
    return out / out.sum()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.15),
])
def test_empirical_frequencies_match_the_analytic_distribution(params):
    logits = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -1.0])
    expected = expected_distribution(logits, params)
    sampler, draws = Sampler(), 20000
    row = SampleInput("r", SamplingParams(**{**params.__dict__, "seed": 7}), (), ())
    counts = torch.zeros(6)
    for sample in sampler.sample(logits.expand(draws, -1), [row] * draws):  # the sampler's own draws, in one batch
        counts[sample.token_id] += 1
    assert torch.all(counts[expected == 0] == 0)  # excluded tokens are never drawn
    support = expected > 0
    statistic = (((counts - draws * expected) ** 2)[support] / (draws * expected[support])).sum().item()
    assert statistic < CHI2_999[int(support.sum()) - 1], (statistic, counts, expected)
    single = [sampler.sample(logits[None], [row])[0].token_id for _ in range(2000)]
    assert all(expected[t] > 0 for t in single)


def test_a_draw_never_lands_on_a_token_without_mass(monkeypatch):
    """A target at the very top of a row's cumulative distribution (where rounding can put it) picks the last token
    with mass, not a masked one after it; one at the bottom picks the first token with mass."""
    from rung.serving.worker.sampling import draw

    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0, 0.0], [0.3, 0.0, 0.7, 0.0, 0.0]])
    generators = [torch.Generator(), torch.Generator()]
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: torch.ones(size))
    assert draw(probs, generators).tolist() == [2, 2]
    monkeypatch.setattr(torch, "rand", lambda *size, generator=None, device=None: torch.zeros(size))
    assert draw(probs, generators).tolist() == [1, 0]


def test_a_seed_reproduces_the_same_tokens_alone_and_in_a_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.0, seed=1234)
    alone = Sampler()
    solo = [alone.sample(logits[1:2], [SampleInput("x", params, (), ())])[0].token_id for _ in range(20)]
    busy = Sampler()
    rows = [SampleInput("a", SamplingParams(temperature=1.0), (), ()), SampleInput("x", params, (), ()),
            SampleInput("b", SamplingParams(temperature=0.5, seed=5), (), ())]
    batched = [busy.sample(logits, rows)[1].token_id for _ in range(20)]
    assert solo == batched


def test_penalties_and_logprobs():
    logits = torch.tensor([1.0, 2.0, -1.0, 0.5])
    row = SampleInput("r", SamplingParams(temperature=0, repetition_penalty=2.0), (1,), (2, 2))
    assert processed_logits(logits, row).tolist() == [1.0, 1.0, -2.0, 0.5]  # divide positives, multiply negatives
    row = SampleInput("r", SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25), (), (1, 1, 3))
    assert processed_logits(logits, row).tolist() == [1.0, 1.0, -1.0, -0.25]
    silent, sample = Sampler().sample(torch.stack([logits.flip(0), logits]), [
        SampleInput("q", SamplingParams(temperature=0), (), ()),
        SampleInput("r", SamplingParams(temperature=0, logprobs=2), (), ())])
    assert sample.token_id == 1 and list(sample.top_logprobs) == [1, 0]
    assert sample.logprob == pytest.approx(torch.log_softmax(logits, -1)[1].item())
    assert (silent.token_id, silent.logprob, silent.top_logprobs) == (2, None, {})  # logprobs unasked: none made


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
                                          ("n", 0), ("min_p", 2.0), ("max_tokens", 0), ("repetition_penalty", 0.0)])
def test_invalid_values_name_their_field(field, value):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**{field: value})
    assert err.value.field == field


def test_logit_bias_comes_before_the_penalties_and_takes_greedy_rows_off_the_fast_path():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0]])
    biased = SamplingParams(temperature=0, logit_bias=((2, 10.0),))
    row = SampleInput("a", biased, prompt_token_ids=(0,), output_token_ids=())
    assert Sampler().sample(logits, [row])[0].token_id == 2  # greedy, yet the bias decides
    # repetition_penalty divides a positive logit: (1 + 10) / 2 = 5.5 > 5 only if the bias was added first
    both = SamplingParams(temperature=0, logit_bias=((2, 10.0),), repetition_penalty=2.0)
    assert processed_logits(logits[0], SampleInput("b", both, (2,), ())).tolist()[2] == pytest.approx(5.5)
    banned = SamplingParams(temperature=1.0, seed=0, logit_bias=((1, -100.0),))
    draws = [Sampler().sample(logits, [SampleInput(f"c{i}", replace(banned, seed=i), (), ())])[0].token_id
             for i in range(50)]
    assert 1 not in draws
    with pytest.raises(SamplingError, match="logit_bias"):
        SamplingParams(logit_bias=((3, 100.5),))


def test_a_grammar_mask_comes_first_keeps_the_models_logprobs_and_never_leaves_a_row_without_tokens():
    from rung.serving.core.structured import StructuredOutput
    from rung.serving.worker.grammar import additive

    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    structured = SamplingParams(temperature=0, logprobs=1, structured=StructuredOutput("regex", "x"),
                                logit_bias=((1, 100.0),))
    sampled = SamplingParams(temperature=1.0, seed=0, structured=StructuredOutput("regex", "x"))
    rows = [SampleInput("a", structured, (), ()), SampleInput("b", sampled, (), ()),
            SampleInput("c", SamplingParams(temperature=0), (), ())]
    allowed = torch.tensor([[False, False, True, True], [False, False, False, False]])
    samples = Sampler().sample(logits.clone(), rows, ([0, 1], additive(allowed)))
    assert samples[0].token_id == 3  # the bias on token 1 cannot lift a masked token; 3 is the best allowed
    assert samples[0].logprob == pytest.approx(torch.log_softmax(logits[0], -1)[3].item())  # the model's own
    assert 0 <= samples[1].token_id < 4  # a mask that allows nothing (a finished grammar) is not applied
    assert samples[2].token_id == 0  # an unconstrained row is untouched


def test_a_batch_processes_each_row_as_it_would_alone():
    """Rows of every kind in one batch — histories of different lengths (a short one padded over a long one, token 0
    among them), penalties on some rows only, greedy rows beside sampled ones — each get exactly their own
    processing."""
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)) * 3
    rows = [SampleInput("a", SamplingParams(temperature=0, repetition_penalty=1.5), (0, 3), (0,)),
            SampleInput("b", SamplingParams(temperature=0.7, top_k=5, frequency_penalty=0.5, presence_penalty=0.25),
                        tuple(range(20)), (7, 7, 7, 0, 9)),
            SampleInput("c", SamplingParams(temperature=1.2, top_p=0.6, min_p=0.05), (), ()),
            SampleInput("d", SamplingParams(temperature=0), (1, 2), (4,)),
            SampleInput("e", SamplingParams(temperature=0.9, repetition_penalty=0.8, logit_bias=((0, -3.0),)),
                        (0, 0, 5), (5, 6))]
    together = processed(logits, rows)
    for index, row in enumerate(rows):
        torch.testing.assert_close(together[index], processed_logits(logits[index], row), rtol=0, atol=0)
    alone = processed_logits(logits[0], rows[0])
    assert alone[0] == logits[0, 0] / 1.5 if logits[0, 0] > 0 else alone[0] == logits[0, 0] * 1.5
    assert torch.equal(alone[4:], logits[0, 4:])
    counted = processed_logits(logits[1], SampleInput("b", SamplingParams(temperature=0, frequency_penalty=0.5,
                                                                          presence_penalty=0.25), (), (7, 7, 7, 0, 9)))
    assert counted[7] == pytest.approx(logits[1, 7].item() - 1.75) and counted[0] == pytest.approx(
        logits[1, 0].item() - 0.75) and counted[1] == logits[1, 1]
    samples = Sampler().sample(logits, [replace(row, params=replace(row.params, seed=3)) for row in rows])
    assert samples[3].token_id == int(logits[3].argmax())  # the plain greedy row took the fast path's pick
    assert samples[0].token_id == int(together[0].argmax())
