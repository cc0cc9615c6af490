"""Paged KV-cache accounting: fixed-size blocks in a preallocated pool, per-request block tables, reference counts
and prefix caching. Pure bookkeeping — no torch: the model runner owns the tensors and reads block ids from here.

Prefix caching: a *full* block is identified by a hash chained on its predecessor's (so equal hashes mean equal
prefixes), confirmed against the block's stored tokens. Blocks whose reference count falls to zero stay cached and
are reused by the next request with that prefix. Free blocks are two pools: empty ones (holding no cached prefix)
and cached ones. New tokens take an empty block whenever one is left — the contiguous placement below places
requests in runs of empty blocks only — and evict a cached block only when no empty one remains, the least
recently freed first. A request never reuses its last prompt token's block from the cache: that token's logits
must be computed.

    pool:  [b0][b1][b2][b3][b4] ...            block_size tokens each
    table: request "a" -> [b3, b0, b4]         tokens 0..15 in b3, 16..31 in b0, 32.. in b4
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set once the block is full and registered in the prefix cache
    tokens: tuple[int, ...] = ()


@dataclass
class _Table:
    blocks: list[int] = field(default_factory=list)
    num_tokens: int = 0  # tokens whose KV has a slot
    num_hashed: int = 0  # leading blocks already registered in the prefix cache
    room: range = range(0)  # the run of block ids it was placed in, which it grows into
    next_in_room: int = 0  # index in `room` of the block its next fresh block should be


def _chain(previous: bytes | None, tokens: tuple[int, ...]) -> bytes:
    digest = hashlib.blake2b(previous or b"", digest_size=16)
    digest.update(b",".join(str(t).encode() for t in tokens))
    return digest.digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("the KV cache needs at least one block of at least one token")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._empty: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # free, no prefix
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, holding a cached prefix; LRU order
        self._is_empty = np.ones(num_blocks, dtype=bool)  # mirrors _empty, for finding runs to place requests in
        self._in_room = np.zeros(num_blocks, dtype=bool)  # inside some running request's room
        self._cached: dict[bytes, int] = {}
        self._tables: dict[str, _Table] = {}
        self.prefix_queries = 0  # blocks looked up
        self.prefix_hits = 0  # blocks found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._empty) + len(self._cached_free)

    @property
    def usage(self) -> float:
        """Share of blocks held by running requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, request_id: str) -> list[int]:
        return list(self._tables[request_id].blocks)

    def lookup_prefix(self, tokens: list[int]) -> list[int]:
        """Cached blocks holding a prefix of `tokens`: full blocks only, and never the block of the last token
        (its logits must be computed). Looking up changes nothing."""
        if not self.enable_prefix_caching:
            return []
        found, previous = [], None
        for index in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[index * self.block_size:(index + 1) * self.block_size])
            previous = _chain(previous, chunk)
            block_id = self._cached.get(previous)
            if block_id is None or self.blocks[block_id].tokens != chunk:
                break
            found.append(block_id)
        return found

    def allocate(self, request_id: str, tokens: list[int], num_new_tokens: int, prefix: list[int] = (),
                 expected_tokens: int = 0) -> bool:
        """Make room for `num_new_tokens` more tokens of `request_id`, whose sequence so far is `tokens`. On a
        request's first call, `prefix` (from lookup_prefix) is taken as already computed, and `expected_tokens`
        (its final length, if known) sizes the run it is placed in. Returns False, changing nothing, when the pool
        cannot hold them.

        Full blocks join the prefix cache as soon as they are allocated, so a request scheduled in the same step
        may reuse them: the runner must write a layer's KV for the whole step before that layer attends."""
        table = self._tables.get(request_id)
        prefix = list(prefix) if table is None else []
        current = table or _Table()
        total = current.num_tokens + len(prefix) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(current.blocks) - len(prefix)
        revived = sum(1 for b in prefix if self.blocks[b].ref_count == 0)  # cached blocks that count as free now
        if needed > self.num_free_blocks - revived:
            return False
        if table is None:
            self.prefix_queries += max((len(tokens) - 1) // self.block_size, 0) if self.enable_prefix_caching else 0
            self.prefix_hits += len(prefix)
        for block_id in prefix:
            self._take(block_id)
        current.blocks.extend(prefix)
        if table is None and needed > 0:  # placed once, at admission: never a scan per decode block
            current.room = self._place(-(-max(expected_tokens, total) // self.block_size) - len(current.blocks),
                                       needed)
        for _ in range(max(needed, 0)):
            current.blocks.append(self._take_next(current))
        current.num_tokens = total
        current.num_hashed = max(current.num_hashed, len(prefix))
        self._tables[request_id] = current
        self._register_full_blocks(current, tokens)
        return True

    def free(self, request_id: str) -> None:
        """Release a request's blocks (last block first, so a shared prefix stays cached longest)."""
        table = self._tables.pop(request_id, None)
        if table is None:
            return
        for block_id in reversed(table.blocks):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None and self._cached.get(block.hash) == block_id:
                    self._cached_free[block_id] = None  # most recently freed last: evicted last
                else:  # a partial block, or a duplicate of a prefix cached elsewhere: nothing worth keeping
                    self._reset(block_id, ref_count=0)
                    self._empty[block_id] = None
                    self._is_empty[block_id] = True
        self._in_room[table.room.start:table.room.stop] = False

    def _place(self, wanted: int, needed: int) -> range:
        """The smallest run of empty blocks nobody grows into that holds `wanted` blocks (else `needed`), claimed
        as the request's room; an empty range when there is none. Cached blocks are never part of a room."""
        placeable = (self._is_empty & ~self._in_room).view(np.int8)
        edges = np.diff(np.concatenate(([0], placeable, [0])))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        for size in (wanted, needed):
            fits = np.flatnonzero(stops - starts >= size)
            if len(fits):
                best = fits[np.argmin(stops[fits] - starts[fits])]
                room = range(int(starts[best]), int(starts[best]) + size)
                self._in_room[room.start:room.stop] = True
                return room
        return range(0)

    def _take_next(self, table: _Table) -> int:
        """The next block of the request's room when it is still empty, else any empty block, else (evicting a
        cached prefix) the least recently freed cached block."""
        wanted = table.room[table.next_in_room] if table.next_in_room < len(table.room) else None
        table.next_in_room += 1
        if wanted is not None and self._is_empty[wanted]:
            del self._empty[wanted]
        elif self._empty:
            wanted, _ = self._empty.popitem(last=False)
        else:
            wanted, _ = self._cached_free.popitem(last=False)  # least recently freed
        self._is_empty[wanted] = False
        return self._reset(wanted)

    def _register_full_blocks(self, table: _Table, tokens: list[int]) -> None:
        if not self.enable_prefix_caching:
            return
        full = min(table.num_tokens, len(tokens)) // self.block_size
        if full <= table.num_hashed:
            return  # most decode steps: no block filled up
        previous = self.blocks[table.blocks[table.num_hashed - 1]].hash if table.num_hashed else None
        for index in range(table.num_hashed, full):
            chunk = tuple(tokens[index * self.block_size:(index + 1) * self.block_size])
            previous = _chain(previous, chunk)
            block = self.blocks[table.blocks[index]]
            block.hash, block.tokens = previous, chunk
            self._cached.setdefault(previous, block.block_id)
        table.num_hashed = max(table.num_hashed, full)

    def _take(self, block_id: int) -> None:
        """A cached block reused for its prefix (free, or shared with a running request)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._cached_free[block_id]
        block.ref_count += 1

    def _reset(self, block_id: int, ref_count: int = 1) -> int:
        """A block taken for new tokens (or freed holding nothing worth keeping): whatever prefix it cached is
        evicted."""
        block = self.blocks[block_id]
        if block.hash is not None and self._cached.get(block.hash) == block_id:
            del self._cached[block.hash]  # evicted from the prefix cache
        block.hash, block.tokens, block.ref_count = None, (), ref_count
        return block_id
