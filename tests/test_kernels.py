"""The compiled decode-attention kernel against the PyTorch path it replaces: the same attention over contexts in
one run, a few and many; the same bits wherever a context sits in the pool and whatever shares its call; and a
clear error for runs outside the pool. `make install` builds it, so these tests require it."""

from __future__ import annotations

import pytest
import torch

from rung.serving import kernels
from rung.serving.model import _attend


def pool(kv_heads: int, head_dim: int, slots: int, dtype: torch.dtype, seed: int = 0):
    """A random KV pool viewed as the model views it: keys [kv heads, head dim, slots], values [kv heads, slots,
    head dim]."""
    rng = torch.Generator().manual_seed(seed)
    cache = torch.randn(2, kv_heads, slots * head_dim, generator=rng).to(dtype)
    return cache[0].view(kv_heads, head_dim, slots), cache[1].view(kv_heads, slots, head_dim)


def scatter(length: int, pieces: int, slots: int, rng: torch.Generator) -> list[slice]:
    """`length` context slots as `pieces` runs at random, non-overlapping places of the pool."""
    cuts = sorted(torch.randperm(length - 1, generator=rng)[:pieces - 1].add(1).tolist())
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, length])]
    bases = torch.randperm(slots // 512, generator=rng)[:pieces].mul(512).tolist()
    return [slice(base, base + size) for base, size in zip(bases, sizes)]


def call(q, keys, values, contexts: list[list[slice]]) -> torch.Tensor:
    starts = [run.start for runs in contexts for run in runs]
    lengths = [run.stop - run.start for runs in contexts for run in runs]
    offsets = [0]
    for runs in contexts:
        offsets.append(offsets[-1] + len(runs))
    return kernels.decode_attention(q, keys, values, torch.tensor(starts), torch.tensor(lengths),
                                    torch.tensor(offsets))


def test_the_kernel_is_built():
    assert kernels.decode_kernel_loaded(), "run `make install`: it builds rung's decode-attention kernel"


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 16), (8, 4, 32), (6, 2, 24), (8, 8, 40)])
def test_kernel_equals_the_pytorch_path(heads, kv_heads, head_dim, dtype, tolerance):
    keys, values = pool(kv_heads, head_dim, 64 * 512, dtype)
    rng = torch.Generator().manual_seed(1)
    contexts = [[slice(0, 1)], [slice(512, 529)], [slice(1024, 1324)]]  # one run: 1, 17, 300 tokens
    contexts += [scatter(n, pieces, 64 * 512, rng) for n, pieces in ((40, 2), (257, 3), (300, 9), (64, 64))]
    q = (torch.randn(len(contexts), heads, head_dim, generator=rng) * head_dim ** -0.5).to(dtype)
    out = call(q, keys, values, contexts)
    assert out.shape == q.shape and out.dtype == dtype
    for index, runs in enumerate(contexts):
        expected = _attend(q[index:index + 1], [keys[:, :, run] for run in runs], [values[:, run] for run in runs],
                           in_place=False).view(heads, head_dim)
        torch.testing.assert_close(out[index].float(), expected.float(), atol=tolerance, rtol=tolerance)


def test_kernel_bits_do_not_depend_on_placement_or_company():
    """The deterministic mode's promise: a request's output is the same bits in one run or scattered in many, alone
    or among other requests."""
    keys, values = pool(2, 32, 64 * 512, torch.float32)
    rng = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 32, generator=rng) * 32 ** -0.5
    scattered = scatter(333, 7, 64 * 512, rng)
    copy_to = slice(63 * 512, 63 * 512 + 333)  # the same context copied into one run
    keys[:, :, copy_to] = torch.cat([keys[:, :, run] for run in scattered], dim=-1)
    values[:, copy_to] = torch.cat([values[:, run] for run in scattered], dim=1)
    alone = call(q, keys, values, [scattered])
    assert torch.equal(alone, call(q, keys, values, [[copy_to]]))
    others = torch.randn(5, 4, 32, generator=rng)
    busy = call(torch.cat([others[:2], q, others[2:]]), keys, values,
                [[slice(0, 50)], [slice(600, 700)], scattered, [slice(5000, 5001)], [slice(9000, 9400)],
                 [slice(1200, 1210)]])
    assert torch.equal(busy[2:3], alone)


def test_kernel_rejects_runs_outside_the_pool():
    keys, values = pool(1, 16, 512, torch.float32)
    q = torch.randn(1, 2, 16)
    with pytest.raises(RuntimeError, match="a run outside the pool"):
        call(q, keys, values, [[slice(500, 520)]])
    with pytest.raises(RuntimeError, match="offsets needs one entry per request"):
        kernels.decode_attention(q, keys, values, torch.tensor([0]), torch.tensor([4]), torch.tensor([0]))
