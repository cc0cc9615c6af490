"""Paged KV-cache bookkeeping: allocation, prefix caching with chained hashes, reference counts, LRU eviction."""

from __future__ import annotations

import random

from rung.serving.core.kv_cache import KVCacheManager


def test_allocation_grows_block_by_block_and_refuses_without_changing_anything():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    tokens = list(range(10))
    assert kv.allocate("a", tokens, 10)  # 10 tokens -> 3 blocks
    assert len(kv.block_table("a")) == 3 and kv.num_free_blocks == 1
    assert kv.allocate("a", tokens + [10, 11], 2)  # fills block 3 exactly
    assert len(kv.block_table("a")) == 3
    assert kv.allocate("a", tokens + [10, 11, 12], 1) and kv.num_free_blocks == 0
    assert not kv.allocate("b", [1, 2, 3], 3)  # pool exhausted: refused
    assert "b" not in kv._tables and kv.num_free_blocks == 0
    kv.free("a")
    assert kv.num_free_blocks == 4 and kv.usage == 0.0


def test_prefix_cache_reuses_full_blocks_but_never_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    prompt = list(range(100, 112))  # exactly 3 full blocks
    assert kv.allocate("a", prompt, len(prompt))
    same = kv.lookup_prefix(prompt)
    assert same == kv.block_table("a")[:2]  # the block holding the last token is recomputed
    longer = prompt + [7, 8, 9]
    assert kv.lookup_prefix(longer) == kv.block_table("a")[:3]
    diverging = prompt[:5] + [0] + prompt[6:]
    assert kv.lookup_prefix(diverging) == kv.block_table("a")[:1]  # chained hashes: stops at the first change
    prefix = kv.lookup_prefix(longer)
    assert kv.allocate("b", longer, len(longer) - 12, prefix=prefix)
    assert kv.block_table("b")[:3] == kv.block_table("a")[:3]
    assert kv.blocks[prefix[0]].ref_count == 2
    assert kv.prefix_hits == 3


def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    assert kv.allocate("a", [1, 2, 3, 4, 5], 5)  # blocks for [1,2] [3,4] [5]
    kv.free("a")
    assert kv.num_free_blocks == 4
    hit = kv.lookup_prefix([1, 2, 3, 4, 9])
    assert len(hit) == 2  # still cached after the request ended
    assert kv.allocate("b", [7, 7, 7, 7, 7, 7], 6)  # needs 3 blocks: evicts the least recently freed ones first
    assert len(kv.lookup_prefix([1, 2, 3, 4, 9])) <= 1
    kv.free("b")
    assert kv.num_free_blocks == 4


def test_placement_keeps_each_request_in_one_run_while_requests_grow_interleaved():
    kv = KVCacheManager(num_blocks=16, block_size=2)
    assert kv.allocate("a", [1, 2, 3], 3, expected_tokens=8)  # room for 4 blocks
    assert kv.allocate("b", [4, 5, 6], 3, expected_tokens=8)
    for step in range(5):  # decode steps, one token each, a and b in turn
        assert kv.allocate("a", [0] * (4 + step), 1)
        assert kv.allocate("b", [0] * (4 + step), 1)
    for request in ("a", "b"):
        table = kv.block_table(request)
        assert table == list(range(table[0], table[0] + len(table))), table  # consecutive: attention reads a view
    assert not set(kv.block_table("a")) & set(kv.block_table("b"))
    kv.free("a")
    assert kv.allocate("c", [7] * 7, 7, expected_tokens=7)  # 4 blocks: a's room is free again
    assert kv.block_table("c") == list(range(kv.block_table("c")[0], kv.block_table("c")[0] + 4))


def test_placement_never_refuses_what_free_blocks_can_hold():
    kv = KVCacheManager(num_blocks=6, block_size=1)
    assert kv.allocate("a", [1], 1, expected_tokens=3)  # room 3 blocks
    assert kv.allocate("b", [1], 1, expected_tokens=3)  # room 3 blocks: nothing placeable left
    assert kv.allocate("c", [1, 2], 2, expected_tokens=10)  # no run anywhere: takes free blocks inside the rooms
    assert kv.allocate("a", [1, 2], 1) and kv.allocate("b", [1, 2], 1)  # rooms partly taken: any free block
    assert kv.num_free_blocks == 0 and not kv.allocate("a", [1, 2, 3], 1)
    for request in "abc":
        kv.free(request)
    assert kv.num_free_blocks == 6 and not kv._in_room.any()


def test_random_workload_always_returns_every_block():
    rng = random.Random(0)
    kv = KVCacheManager(num_blocks=64, block_size=4)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 20))] for _ in range(5)]
    live: dict[str, list[int]] = {}
    for step in range(2000):
        if live and rng.random() < 0.3:
            request = rng.choice(sorted(live))
            if rng.random() < 0.5:
                kv.free(request)
                del live[request]
            else:
                live[request].append(rng.randrange(50))
                kv.allocate(request, live[request], 1) or (kv.free(request), live.pop(request))
        else:
            request = f"r{step}"
            tokens = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 12))]
            prefix = kv.lookup_prefix(tokens)
            if kv.allocate(request, tokens, len(tokens) - len(prefix) * kv.block_size, prefix=prefix,
                           expected_tokens=len(tokens) + rng.randrange(8)):
                live[request] = tokens
        held = sum(len(kv.block_table(r)) for r in live)
        shared = sum(b.ref_count for b in kv.blocks)
        assert shared == held  # every table entry is one reference
        assert kv.num_free_blocks == sum(1 for b in kv.blocks if b.ref_count == 0)
        assert kv._is_empty.sum() == len(kv._empty) and all(kv.blocks[b].hash is None for b in kv._empty)
    for request in list(live):
        kv.free(request)
    assert kv.num_free_blocks == kv.num_blocks and all(b.ref_count == 0 for b in kv.blocks)
    assert kv.prefix_hits > 0 and not kv._in_room.any()


def test_new_requests_take_empty_blocks_before_any_cached_prefix():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    assert kv.allocate("a", [1, 2, 3, 4], 4)  # two full blocks, cached when a ends
    kv.free("a")
    for step in range(5):  # other requests come and go while empty blocks remain (one partial block each)
        assert kv.allocate(f"x{step}", [9], 1, expected_tokens=4)
        assert len(kv.lookup_prefix([1, 2, 3, 4, 5])) == 2, step  # a's prefix survives
        kv.free(f"x{step}")
    assert kv.allocate("y", [8] * 12, 12)  # six blocks: every empty one, and no cached one yet
    assert len(kv.lookup_prefix([1, 2, 3, 4, 5])) == 2


def test_cached_blocks_are_evicted_least_recently_freed_first_once_no_empty_block_is_left():
    kv = KVCacheManager(num_blocks=4, block_size=2)
    assert kv.allocate("old", [1, 2, 3], 3)
    assert kv.allocate("new", [5, 6, 7], 3)
    kv.free("old")  # [1,2] cached, freed first
    kv.free("new")  # [5,6] cached, freed last
    assert kv.allocate("z", [9, 9, 9, 9, 9, 9], 6)  # three blocks: two empty, then one cached — the older
    assert kv.lookup_prefix([1, 2, 0]) == [] and len(kv.lookup_prefix([5, 6, 0])) == 1


def test_an_exact_repeat_of_prompts_that_fit_hits_at_least_90_percent_of_full_blocks():
    rng = random.Random(1)
    kv = KVCacheManager(num_blocks=768, block_size=16)
    prompts = [[rng.randrange(1000) for _ in range(rng.randrange(20, 200))] for _ in range(64)]
    assert sum(-(-(len(p) + 32) // 16) for p in prompts) <= kv.num_blocks  # they all fit in the pool

    def run_pass(tag: str) -> None:
        live = []
        for index, prompt in enumerate(prompts):
            prefix = kv.lookup_prefix(prompt)
            assert kv.allocate(f"{tag}{index}", prompt, len(prompt) - len(prefix) * 16, prefix=prefix,
                               expected_tokens=len(prompt) + 32)
            live.append(f"{tag}{index}")
            if len(live) > 8:  # eight at a time, as a server at concurrency 8
                kv.free(live.pop(0))
        for request in live:
            kv.free(request)

    run_pass("first")
    queries, hits = kv.prefix_queries, kv.prefix_hits
    run_pass("repeat")
    repeat_queries, repeat_hits = kv.prefix_queries - queries, kv.prefix_hits - hits
    assert repeat_queries > 300 and repeat_hits >= 0.9 * repeat_queries, (repeat_hits, repeat_queries)
