"""The scaling rules, checked against the reference table (hparam-transfer.md) at two widths and two depths.

Expected values are written out from the table here, independently of rung.jobs.params.parametrization.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rung.config import evolve
from rung.jobs.config import DataConfig, ModelConfig, MoEConfig, ParamConfig, RunConfig, TrainConfig
from rung.jobs.model.build import build_model
from rung.jobs.params.parametrization import Parametrization
from rung.jobs.params.roles import Role
from rung.jobs.train.schedule import lr_factor

SIGMA, LR, WD, EPS = 0.02, 1e-2, 0.1, 1e-8
BASE_WIDTH, BASE_DEPTH, HEAD_DIM = 64, 2, 16


def config(name: str, width: int, depth: int, moe: bool = False) -> RunConfig:
    return RunConfig(
        model=ModelConfig(vocab_size=512, d_model=width, n_layers=depth, n_heads=width // HEAD_DIM,
                          moe=MoEConfig(n_experts=4, top_k=2) if moe else None),
        param=ParamConfig(name=name, base_width=BASE_WIDTH, base_depth=BASE_DEPTH, init_std=SIGMA),
        data=DataConfig(vocab_size=512),
        train=TrainConfig(lr=LR, weight_decay=WD, adam_eps=EPS),
    )


def expected(name: str, m: float, m_l: float) -> dict:
    """The table, by hand: per role (init std, lr ×, wd ×, eps ×) and the forward multipliers."""
    width = name != "sp"
    alpha = {"depth-mup": 0.5, "completep": 1.0}.get(name)
    m = m if width else 1.0
    depth = (lambda e: m_l ** e) if alpha is not None else (lambda e: 1.0)
    a = alpha or 0.0
    roles = {
        "embedding": (SIGMA, 1, 1, 1),
        "hidden": (SIGMA / math.sqrt(m), depth(a - 1) / m, m, depth(-a) / m),
        "block_norm": (None, depth(a - 1), 1, 1),
        "final_norm": (None, 1, 1, 1),
        "readout": (SIGMA, 1, 1, 1),
        "router": (SIGMA, 1, 1, 1),
    }
    forward = {"residual": depth(-a), "output": 1 / m, "router": 1 / m,
               "attention": (math.sqrt(HEAD_DIM) / HEAD_DIM) if width else 1 / math.sqrt(HEAD_DIM)}
    return {"roles": roles, "forward": forward}


@pytest.mark.parametrize("name", ["sp", "mup", "depth-mup", "completep"])
@pytest.mark.parametrize("width, depth", [(128, 4), (256, 8)])
def test_rules_match_the_reference_table(name, width, depth):
    cfg = config(name, width, depth, moe=True)
    model, param = build_model(cfg)
    want = expected(name, width / BASE_WIDTH, depth / BASE_DEPTH)
    mult = param.multipliers
    for key, value in want["forward"].items():
        assert getattr(mult, key) == pytest.approx(value), key
    groups = {g["name"]: g for g in param.param_groups(model, LR, WD, EPS)}
    assert set(groups) == set(want["roles"])
    for role, (std, lr_mult, wd_mult, eps_mult) in want["roles"].items():
        group = groups[role]
        assert group["lr"] == pytest.approx(LR * lr_mult), role
        assert group["weight_decay"] == pytest.approx(WD * wd_mult), role
        assert group["eps"] == pytest.approx(EPS * eps_mult), role
        values = torch.cat([p.detach().flatten() for p in group["params"]])
        if std is None:
            assert torch.all(values == 1), role
        else:  # the weights actually drawn, not just the rule
            assert values.std().item() == pytest.approx(std, rel=0.05), role


DAMPING = 1e-5
# the hidden matrices' rows of the module docstring's tables as functions of m, m_L and α (0 where depth is not
# scaled): LR ×, WD ×, own fields
MATRIX_RULES = {"muon": lambda m, m_l, a: (m_l ** (a - 1) / math.sqrt(m), math.sqrt(m), {}),
                "shampoo": lambda m, m_l, a: (m_l ** (a - 1), 1.0, {"damping": DAMPING}),
                "kfac": lambda m, m_l, a: (1 / m_l, m_l ** a, {"damping": DAMPING * m_l ** (-2 * a)})}


@pytest.mark.parametrize("optimizer", MATRIX_RULES)
@pytest.mark.parametrize("name", ["sp", "mup", "depth-mup", "completep"])
@pytest.mark.parametrize("width, depth", [(128, 4), (256, 8)])
def test_matrix_optimizer_rules_match_their_table_and_leave_other_roles_to_adamw(optimizer, name, width, depth):
    """Under train.optimizer=muon|shampoo|kfac the hidden matrices (experts' too) form that optimizer's group with
    the table's LR and WD (Muon: × m^(−½)·m_L^(α−1), × m^½; Shampoo: × m_L^(α−1), × 1, damping × 1; K-FAC:
    × m_L^(−1), × m_L^α, damping × m_L^(−2α)), LR × WD equal to AdamW's; every other group is AdamW's, exactly as
    under adamw; init is the hidden rule's σ/√m."""
    cfg = config(name, width, depth, moe=True)
    model, param = build_model(cfg)
    m = width / BASE_WIDTH if name != "sp" else 1.0
    alpha = {"depth-mup": 0.5, "completep": 1.0}.get(name)
    m_l = depth / BASE_DEPTH if alpha is not None else 1.0
    lr_mult, wd_mult, own = MATRIX_RULES[optimizer](m, m_l, alpha or 0.0)
    matrix = {g["name"]: g for g in param.param_groups(model, LR, WD, EPS, optimizer, DAMPING)}
    adamw = {g["name"]: g for g in param.param_groups(model, LR, WD, EPS)}
    hidden = matrix.pop(f"hidden-{optimizer}")
    assert hidden["optimizer"] == optimizer and "eps" not in hidden
    assert {key: hidden.get(key) for key in own} == pytest.approx(own) and ("damping" in hidden) == ("damping" in own)
    assert hidden["lr"] == pytest.approx(LR * lr_mult)
    assert hidden["weight_decay"] == pytest.approx(WD * wd_mult)
    assert hidden["lr"] * hidden["weight_decay"] == pytest.approx(adamw["hidden"]["lr"] * adamw["hidden"]["weight_decay"])
    assert [p.dim() for p in hidden["params"]] == [2] * len(hidden["params"])
    assert {id(p) for p in hidden["params"]} == {id(p) for p in adamw.pop("hidden")["params"]}
    assert param.rule(Role.HIDDEN, optimizer).init_std == pytest.approx(cfg.param.init_std / math.sqrt(m))
    strip = lambda group: {k: v for k, v in group.items() if k != "params"}  # noqa: E731
    assert {k: strip(g) for k, g in matrix.items()} == {k: strip(g) for k, g in adamw.items()}


@pytest.mark.parametrize("name", ["sp", "mup", "depth-mup", "completep"])
@pytest.mark.parametrize("width, depth", [(128, 4), (256, 8)])
def test_soap_takes_adamws_rules_for_its_hidden_matrices(name, width, depth):
    """SOAP is Adam in a rotated basis: its group of hidden matrices has AdamW's LR, WD and ε multipliers."""
    model, param = build_model(config(name, width, depth, moe=True))
    soap = {g["name"]: g for g in param.param_groups(model, LR, WD, EPS, "soap")}
    adamw = {g["name"]: g for g in param.param_groups(model, LR, WD, EPS)}
    strip = lambda group: {k: v for k, v in group.items() if k not in ("params", "name", "optimizer")}  # noqa: E731
    assert soap["hidden-soap"]["optimizer"] == "soap"
    assert strip(soap.pop("hidden-soap")) == strip(adamw.pop("hidden"))
    assert {k: strip(g) for k, g in soap.items()} == {k: strip(g) for k, g in adamw.items()}


@pytest.mark.parametrize("optimizer", MATRIX_RULES)
def test_matrix_optimizers_at_the_base_shape_are_the_same_for_every_parametrization(optimizer):
    groups = {name: [{k: v for k, v in g.items() if k != "params"}
                     for g in Parametrization(cfg.param, cfg.model).param_groups(build_model(cfg)[0], LR, WD, EPS,
                                                                                  optimizer, DAMPING)]
              for name in ("sp", "mup", "depth-mup", "completep")
              for cfg in [config(name, BASE_WIDTH, BASE_DEPTH)]}
    assert groups["mup"] == groups["sp"] == groups["depth-mup"] == groups["completep"]
    hidden = next(g for g in groups["sp"] if g["optimizer"] == optimizer)
    assert (hidden["lr"], hidden["weight_decay"], hidden.get("damping", DAMPING)) == (LR, WD, DAMPING)


def test_sp_equals_mup_at_the_base_shape():
    sp_model, sp = build_model(config("sp", BASE_WIDTH, BASE_DEPTH))
    mup_model, mup = build_model(config("mup", BASE_WIDTH, BASE_DEPTH))
    for (name, a), (_, b) in zip(sp_model.named_parameters(), mup_model.named_parameters()):
        assert torch.equal(a, b), name
    assert sp.multipliers == mup.multipliers
    strip = lambda groups: [{k: v for k, v in g.items() if k != "params"} for g in groups]
    assert strip(sp.param_groups(sp_model, LR, WD, EPS)) == strip(mup.param_groups(mup_model, LR, WD, EPS))
    tokens = torch.randint(0, 512, (2, 16))
    assert torch.equal(sp_model(tokens).logits, mup_model(tokens).logits)


def test_completep_at_base_depth_equals_mup():
    cp_model, cp = build_model(config("completep", 128, BASE_DEPTH))
    mup_model, mup = build_model(config("mup", 128, BASE_DEPTH))
    assert cp.multipliers == mup.multipliers
    tokens = torch.randint(0, 512, (2, 16))
    assert torch.equal(cp_model(tokens).logits, mup_model(tokens).logits)


def test_untagged_parameter_is_refused():
    cfg = config("mup", 128, 2)
    model, param = build_model(cfg)
    model.extra = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra.weight has no role"):
        param.param_groups(model, LR, WD, EPS)


def test_zero_readout():
    cfg = evolve(config("mup", 128, 2), {"param.zero_readout": True})
    model, _ = build_model(cfg)
    assert torch.count_nonzero(model.lm_head.weight) == 0
    assert Parametrization(cfg.param, cfg.model).rule(Role.READOUT).init_std == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_scale_every_group_relatively(schedule):
    cfg = evolve(config("mup", 256, 4), {"train.schedule": schedule, "train.steps": 100, "train.warmup_steps": 10})
    model, param = build_model(cfg)
    optimizer = torch.optim.AdamW(param.param_groups(model, LR, WD, EPS))
    base = [g["lr"] for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    factors = []
    for step in range(100):
        factor = lr_factor(step, cfg.train)
        factors.append(factor)
        for group, lr in zip(optimizer.param_groups, base):
            assert group["lr"] == pytest.approx(lr * factor)
        optimizer.step()
        scheduler.step()
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)  # linear warmup
    if schedule == "constant":
        assert factors[-1] == 1.0
    else:
        assert factors[-1] == pytest.approx(cfg.train.min_lr_ratio, abs=0.02)
    if schedule == "wsd":  # stable at the peak until the last decay_fraction of training
        assert factors[79] == 1.0 and factors[81] < 1.0
