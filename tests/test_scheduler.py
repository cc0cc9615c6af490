"""Continuous batching: token budget, decode-first, chunked prefill, admission, preemption, abort, stop rules."""

from __future__ import annotations

import random
import subprocess
import sys

from rung.serving.core.kv_cache import KVCacheManager
from rung.serving.core.params import SamplingParams
from rung.serving.core.request import Request, Status
from rung.serving.core.scheduler import PENDING, Scheduler


def run_step(scheduler: Scheduler, token: int = 7):
    plan = scheduler.schedule()
    return plan, scheduler.update(plan, {s.request_id: token for s in plan.spans if s.samples})


def test_the_scheduler_imports_no_torch():
    code = "import sys, rung.serving.core.scheduler; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_decodes_come_first_and_long_prompts_are_chunked_into_the_budget():
    scheduler = Scheduler(KVCacheManager(num_blocks=64, block_size=4), max_num_batched_tokens=16)
    scheduler.add(Request("short", list(range(5)), params=SamplingParams(max_tokens=3)))
    plan, _ = run_step(scheduler)
    assert [(s.request_id, s.start, s.num_tokens, s.samples) for s in plan.spans] == [("short", 0, 5, True)]
    scheduler.add(Request("long", list(range(100, 140)), params=SamplingParams(max_tokens=2)))
    plan, _ = run_step(scheduler)
    assert [(s.request_id, s.num_tokens) for s in plan.spans] == [("short", 1), ("long", 15)]  # decode first
    assert not plan.spans[1].samples  # a prefill chunk that does not reach the prompt's end samples nothing
    chunks = [15]
    while scheduler.requests.get("long") and scheduler.requests["long"].num_computed_tokens < 40:
        plan, _ = run_step(scheduler)
        chunks += [s.num_tokens for s in plan.spans if s.request_id == "long"]
        assert plan.num_tokens <= 16
    assert sum(chunks) == 40


def test_max_num_seqs_and_admission_control():
    scheduler = Scheduler(KVCacheManager(num_blocks=4, block_size=4), max_num_seqs=2)
    for i in range(3):
        scheduler.add(Request(f"r{i}", [i] * 3, params=SamplingParams(max_tokens=50)))
    plan, _ = run_step(scheduler)
    assert [s.request_id for s in plan.spans] == ["r0", "r1"] and len(scheduler.waiting) == 1


def test_preemption_under_block_pressure_recomputes_and_finishes_everything():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    scheduler = Scheduler(kv, max_num_batched_tokens=64)
    for i in range(4):
        scheduler.add(Request(f"r{i}", list(range(i, i + 6)), params=SamplingParams(max_tokens=10)))
    finished, steps = [], 0
    while scheduler.has_work and steps < 500:
        plan, done = run_step(scheduler, token=1)
        finished += done
        steps += 1
    assert sorted(r.request_id for r in finished) == ["r0", "r1", "r2", "r3"]
    assert all(len(r.output_token_ids) == 10 and r.status is Status.FINISHED_LENGTH for r in finished)
    assert scheduler.num_preemptions > 0  # the pool holds 24 tokens; four requests need 64
    assert kv.num_free_blocks == kv.num_blocks


def test_priority_orders_admission():
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4), max_num_seqs=1)
    scheduler.add(Request("late-but-urgent", [1, 2], params=SamplingParams(max_tokens=1), priority=-1, arrival=2.0))
    scheduler.add(Request("early", [1, 2], params=SamplingParams(max_tokens=1), priority=0, arrival=1.0))
    plan, _ = run_step(scheduler)
    assert [s.request_id for s in plan.spans] == ["late-but-urgent"]


def test_abort_frees_blocks_at_any_time():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv, max_num_batched_tokens=8)
    scheduler.add(Request("a", list(range(30)), params=SamplingParams(max_tokens=5)))
    plan = scheduler.schedule()  # mid-prefill
    assert scheduler.abort("a") and kv.num_free_blocks == 16
    assert scheduler.update(plan, {}) == [] and not scheduler.has_work
    assert not scheduler.abort("a")


def test_stop_rules():
    scheduler = Scheduler(KVCacheManager(num_blocks=16, block_size=4))
    scheduler.add(Request("eos", [1, 2], params=SamplingParams(max_tokens=10), eos_token_ids=frozenset({0})))
    scheduler.add(Request("ignore", [1, 2], params=SamplingParams(max_tokens=3, ignore_eos=True), eos_token_ids=frozenset({0})))
    scheduler.add(Request("min", [1, 2], params=SamplingParams(max_tokens=5, min_tokens=2), eos_token_ids=frozenset({0})))
    outcomes = {}
    while scheduler.has_work:
        _, done = run_step(scheduler, token=0)
        outcomes.update({r.request_id: (r.status, len(r.output_token_ids)) for r in done})
    assert outcomes == {"eos": (Status.FINISHED_STOPPED, 1), "ignore": (Status.FINISHED_LENGTH, 3),
                        "min": (Status.FINISHED_STOPPED, 2)}


def test_prefix_cache_hits_skip_computation_and_every_block_returns():
    rng = random.Random(1)
    kv = KVCacheManager(num_blocks=40, block_size=4)
    scheduler = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=32)
    system = list(range(200, 224))  # a shared 24-token prefix
    for i in range(12):
        scheduler.add(Request(f"r{i}", system + [rng.randrange(100) for _ in range(5)], params=SamplingParams(max_tokens=4)))
    computed = 0
    while scheduler.has_work:
        plan, _ = run_step(scheduler, token=rng.randrange(100))
        computed += plan.num_tokens
    assert kv.prefix_hits > 0 and computed < 12 * (29 + 3)  # cached prefix blocks were not recomputed
    assert kv.num_free_blocks == kv.num_blocks


def test_a_step_planned_while_the_last_computes_continues_from_its_pending_token():
    """Async scheduling: the next plan is made before the step in flight has sampled."""
    kv = KVCacheManager(num_blocks=16, block_size=4)
    scheduler = Scheduler(kv)
    scheduler.add(Request("a", [1, 2, 3], params=SamplingParams(max_tokens=2)))
    first = scheduler.schedule()
    second = scheduler.schedule()  # while the first computes
    assert [(s.start, s.token_ids, s.samples) for s in second.spans] == [(3, (PENDING,), True)]
    assert all(PENDING not in block.tokens for block in kv.blocks)  # an unknown token never keys the prefix cache
    assert scheduler.schedule().spans == []  # the token the second step samples is its last (max_tokens=2)
    assert scheduler.update(first, {"a": 8}) == []
    assert [r.output_token_ids for r in scheduler.update(second, {"a": 9})] == [[8, 9]]
    assert not scheduler.has_work and kv.num_free_blocks == kv.num_blocks
