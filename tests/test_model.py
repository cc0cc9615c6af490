"""The model family: parameter/FLOP counters against independent counts, and MoE routing semantics."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from rung.jobs.config import DataConfig, ModelConfig, MoEConfig, ParamConfig, RunConfig
from rung.jobs.model.build import build_model
from rung.jobs.model.counting import count
from rung.jobs.model.moe import expert_capacity, load_balance_loss, route

SHAPES = {
    "dense": dict(),
    "gqa-tied": dict(n_kv_heads=2, tie_embeddings=True),
    "head-dim": dict(head_dim=32, n_heads=2),
    "moe": dict(moe=MoEConfig(n_experts=4, top_k=2)),
    "moe-shared": dict(moe=MoEConfig(n_experts=4, top_k=1, shared_expert=True), tie_embeddings=True),
}


def run_config(**model) -> RunConfig:
    shape = {"vocab_size": 300, "d_model": 64, "n_layers": 3, "n_heads": 4, **model}
    return RunConfig(model=ModelConfig(**shape),
                     param=ParamConfig(name="mup"), data=DataConfig(vocab_size=300))


@pytest.mark.parametrize("shape", SHAPES)
def test_parameter_counts_match_named_parameters(shape):
    cfg = run_config(**SHAPES[shape])
    model, _ = build_model(cfg)
    size = count(cfg.model, seq_len=32)
    named = dict(model.named_parameters())
    assert size.total_params == sum(p.numel() for p in named.values())
    embedding = sum(p.numel() for n, p in named.items() if n in ("embed_tokens.weight", "lm_head.weight"))
    assert size.non_embedding_params == size.total_params - embedding
    moe = cfg.model.moe
    if moe is None:
        assert size.active_params == size.total_params
    else:  # the experts a token does not visit are inactive
        per_expert = sum(p.numel() for n, p in named.items() if ".experts.0." in n) // cfg.model.n_layers
        inactive = cfg.model.n_layers * (moe.n_experts - moe.top_k) * per_expert
        assert size.active_params == size.total_params - inactive


def test_moe_with_every_expert_active_counts_as_the_dense_model_of_the_same_size():
    moe = run_config(moe=MoEConfig(n_experts=4, top_k=4), ffn_mult=1.0)
    dense = run_config(ffn_mult=4.0)  # one FFN as wide as the four experts together
    moe_size, dense_size = count(moe.model, 32), count(dense.model, 32)
    routers = moe.model.n_layers * moe.model.d_model * 4
    assert moe_size.active_params == moe_size.total_params
    assert moe_size.active_params - routers == dense_size.active_params


@pytest.mark.parametrize("shape", ["dense", "gqa-tied", "head-dim"])
def test_flops_match_torch_flop_counter(shape):
    """torch counts the parameter matmuls (its CPU SDPA path is not counted), so the attention-score term
    12·L·H·d_head·T is checked on its own against an explicit q·kᵀ and attention·v of the same shape."""
    cfg = run_config(**SHAPES[shape])
    seq, batch = 32, 2
    model, _ = build_model(cfg)
    tokens = torch.randint(0, 300, (batch, seq))
    with FlopCounterMode(display=False) as counter:
        model(tokens).logits.sum().backward()
    size = count(cfg.model, seq)
    heads, head_dim, layers = cfg.model.n_heads, cfg.model.resolved_head_dim, cfg.model.n_layers
    attention = 12 * layers * heads * head_dim * seq
    assert counter.get_total_flops() / (batch * seq) == size.flops_per_token - attention
    q = torch.randn(batch, heads, seq, head_dim, requires_grad=True)
    k = torch.randn(batch, heads, seq, head_dim, requires_grad=True)
    v = torch.randn(batch, heads, seq, head_dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        ((q @ k.transpose(-1, -2)).softmax(-1) @ v).sum().backward()
    assert counter.get_total_flops() * layers / (batch * seq) == attention


def test_routing_sends_tokens_to_their_top_k_experts():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0], [0.0, 1.0, 5.0, 2.0], [1.0, 1.5, 0.0, 9.0]])
    routing = route(logits, top_k=2, capacity=None)
    assert routing.experts.tolist() == [[0, 1], [2, 3], [3, 1]]
    probs = torch.softmax(logits, -1)
    top = probs.gather(1, routing.experts)
    assert torch.allclose(routing.gates, top / top.sum(-1, keepdim=True))
    assert routing.kept.all()


def test_moe_layer_uses_only_the_routed_experts():
    cfg = run_config(moe=MoEConfig(n_experts=4, top_k=1, capacity_factor=None))
    model, _ = build_model(cfg)
    moe = model.layers[0].mlp
    with torch.no_grad():  # a fixed router: every token goes to expert 2
        moe.router.weight.zero_()
        moe.router.weight[2] = 1.0
        x = torch.rand(1, 5, 64) + 0.1
        out, stats = moe(x)
        assert torch.allclose(out, moe.experts["2"](x), atol=1e-6)
    assert stats.expert_load.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert stats.dropped_fraction.item() == 0.0


def test_load_balance_loss_minimum_is_one_when_balanced_and_grows_otherwise():
    n_experts, tokens = 4, 64
    balanced_experts = torch.arange(tokens).remainder(n_experts).unsqueeze(1)
    uniform = torch.full((tokens, n_experts), 1 / n_experts)
    assert load_balance_loss(uniform, balanced_experts).item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(tokens, -1)
    half = torch.where(torch.arange(tokens) < tokens // 2, 0, torch.arange(tokens).remainder(n_experts)).unsqueeze(1)
    all_to_one = torch.zeros(tokens, 1, dtype=torch.long)
    losses = [load_balance_loss(skewed_probs, e).item() for e in (balanced_experts, half, all_to_one)]
    assert losses[0] == pytest.approx(1.0)  # balanced assignment: minimum whatever the probabilities
    assert losses[0] < losses[1] < losses[2] == pytest.approx(n_experts * 0.7)


def test_capacity_drops_exactly_the_overflow_slot_major():
    # 6 tokens, 2 experts, top-1: five pick expert 0, one picks expert 1. Capacity = ceil(1.0 * 6 * 1 / 2) = 3.
    logits = torch.tensor([[2.0, 0.0]] * 5 + [[0.0, 2.0]])
    capacity = expert_capacity(6, 1, 2, capacity_factor=1.0)
    assert capacity == 3
    routing = route(logits, top_k=1, capacity=capacity)
    assert routing.kept.squeeze(1).tolist() == [True, True, True, False, False, True]  # first come, first served
    assert torch.all(routing.gates[~routing.kept] == 0)
    # top-2: every first choice is placed before any second choice.
    logits = torch.tensor([[2.0, 1.0, 0.0]] * 4)
    routing = route(logits, top_k=2, capacity=expert_capacity(4, 2, 3, capacity_factor=0.75))  # 2 slots each
    assert routing.kept.tolist() == [[True, True], [True, True], [False, False], [False, False]]


def test_dropped_fraction_is_reported():
    cfg = run_config(moe=MoEConfig(n_experts=2, top_k=1, capacity_factor=0.5))
    model, _ = build_model(cfg)
    moe = model.layers[0].mlp
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0
        _, stats = moe(torch.rand(1, 8, 64) + 0.1)  # 8 tokens all to expert 0, 2 slots: 6 dropped
    assert stats.dropped_fraction.item() == pytest.approx(6 / 8)
    assert stats.expert_load.tolist() == [1.0, 0.0]
    assert stats.aux_loss.item() > 1.0  # unbalanced
