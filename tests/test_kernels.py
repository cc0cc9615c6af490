"""rung's compiled CPU kernels against the PyTorch code they replace: decode and prefill attention over contexts in
one run, a few and many (the same bits wherever a context sits in the pool and whatever shares its call, and a
clear error for runs outside the pool), the KV writes, the fused rotary embedding, RMSNorm and SwiGLU activation,
and the packed linear layers.
`make install` builds them, so these tests require them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rung.serving.worker.ops import cpu_kernels as kernels
from rung.serving.worker.ops.torch_ops import attend, rms_norm, rope, rope_tables


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


def test_the_kernels_are_built():
    assert kernels.loaded(), "run `make install`: it builds rung's kernels"


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
        expected = attend(q[index:index + 1], [keys[:, :, run] for run in runs], [values[:, run] for run in runs],
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
    with pytest.raises(RuntimeError, match="offsets needs one entry per sequence"):
        kernels.decode_attention(q, keys, values, torch.tensor([0]), torch.tensor([4]), torch.tensor([0]))


def call_prefill(q, keys, values, spans: list[tuple[int, int, list[slice]]]) -> torch.Tensor:
    """The prefill kernel over spans (first row, rows, runs); rows no span covers stay NaN."""
    out = torch.full_like(q, float("nan"))
    starts = [run.start for _, _, runs in spans for run in runs]
    lengths = [run.stop - run.start for _, _, runs in spans for run in runs]
    offsets = [0]
    for _, _, runs in spans:
        offsets.append(offsets[-1] + len(runs))
    kernels.prefill_attention(q, keys, values, torch.tensor([first for first, _, _ in spans]),
                              torch.tensor([rows for _, rows, _ in spans]), torch.tensor(starts),
                              torch.tensor(lengths), torch.tensor(offsets), out)
    return out


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 1, 16), (6, 2, 64), (8, 8, 40), (4, 4, 128), (16, 2, 256),
                                                     (3, 3, 24)])
def test_prefill_kernel_equals_the_pytorch_path(heads, kv_heads, head_dim, dtype, tolerance):
    """Whole prompts and chunks after an earlier context (a cached prefix, an earlier chunk), in one run and in
    many, with tiles and key blocks cut mid-run, for head dims 16-256 and GQA ratios 1-8, all spans in one call;
    rows of no span (a decode's) are left alone."""
    keys, values = pool(kv_heads, head_dim, 64 * 512, dtype)
    rng = torch.Generator().manual_seed(6)
    spans = [(1, 2, [slice(0, 2)]), (3, 17, [slice(512, 529)]), (20, 40, [slice(1024, 1324)]),  # 40 rows of 300
             (60, 33, scatter(33, 3, 64 * 512, rng)), (93, 100, scatter(257, 5, 64 * 512, rng))]
    tokens = 194  # rows 0 and 193 belong to no span
    q = (torch.randn(tokens, heads, head_dim, generator=rng) * head_dim ** -0.5).to(dtype)
    out = call_prefill(q, keys, values, spans)
    covered = torch.zeros(tokens, dtype=torch.bool)
    for first, rows, runs in spans:
        covered[first:first + rows] = True
        expected = attend(q[first:first + rows], [keys[:, :, run] for run in runs], [values[:, run] for run in runs],
                          in_place=False).view(rows, heads, head_dim)
        torch.testing.assert_close(out[first:first + rows].float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert out[~covered].isnan().all()


def test_prefill_kernel_bits_do_not_depend_on_placement_or_company():
    keys, values = pool(2, 32, 64 * 512, torch.float32)
    rng = torch.Generator().manual_seed(7)
    q = torch.randn(70, 6, 32, generator=rng) * 32 ** -0.5
    scattered = scatter(333, 7, 64 * 512, rng)
    copy_to = slice(63 * 512, 63 * 512 + 333)
    keys[:, :, copy_to] = torch.cat([keys[:, :, run] for run in scattered], dim=-1)
    values[:, copy_to] = torch.cat([values[:, run] for run in scattered], dim=1)
    alone = call_prefill(q, keys, values, [(0, 70, scattered)])
    assert torch.equal(alone, call_prefill(q, keys, values, [(0, 70, [copy_to])]))
    others = torch.randn(30, 6, 32, generator=rng)
    busy = call_prefill(torch.cat([others[:10], q, others[10:]]), keys, values,
                        [(0, 10, [slice(0, 50)]), (10, 70, scattered), (80, 20, [slice(9000, 9400)])])
    assert torch.equal(busy[10:80], alone)


def test_prefill_kernel_rejects_spans_that_do_not_fit():
    keys, values = pool(1, 16, 512, torch.float32)
    q = torch.randn(8, 2, 16)
    with pytest.raises(RuntimeError, match="a run outside the pool"):
        call_prefill(q, keys, values, [(0, 8, [slice(500, 520)])])
    with pytest.raises(RuntimeError, match="the newest of its context"):
        call_prefill(q, keys, values, [(0, 8, [slice(0, 4)])])
    with pytest.raises(RuntimeError, match="rows outside q"):
        call_prefill(q, keys, values, [(4, 8, [slice(0, 10)])])


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
def test_rotary_rms_norm_and_swiglu_equal_pytorch(dtype, tolerance):
    rng = torch.Generator().manual_seed(3)
    qkv = torch.randn(37, 10, 24, generator=rng).to(dtype)  # the rotated q/k heads are a view of a wider output
    cos, sin = rope_tables(torch.randint(0, 4000, (37,), generator=rng), 24, 10000.0)
    expected = rope(qkv[:, :6], cos, sin)
    untouched = qkv[:, 6:].clone()
    rotated = kernels.rotary_(qkv[:, :6], cos, sin)
    torch.testing.assert_close(rotated.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(qkv[:, 6:], untouched) and rotated.data_ptr() == qkv.data_ptr()  # in place, in bounds
    x, weight = torch.randn(37, 200, generator=rng).to(dtype), torch.randn(200, generator=rng).to(dtype)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5).float(), rms_norm(x, weight, 1e-5).float(),
                               atol=tolerance, rtol=tolerance)
    gate_up = (torch.randn(37, 2 * 90, generator=rng) * 30).to(dtype)  # wide enough to reach exp's clamps
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_and_mul(gate_up).float(), (F.silu(gate) * up).float(),
                               atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_places_keys_and_values_as_indexing_does(dtype):
    keys, values = pool(2, 24, 512, dtype)
    expected_keys, expected_values = keys.clone(), values.clone()
    rng = torch.Generator().manual_seed(4)
    kv = torch.randn(9, 6, 24, generator=rng).to(dtype)  # k and v are views of one projection's output
    k, v, slots = kv[:, 2:4], kv[:, 4:], torch.tensor([3, 4, 5, 6, 100, 101, 300, 511, 0])
    expected_keys[:, :, slots] = k.permute(1, 2, 0)
    expected_values[:, slots] = v.transpose(0, 1)
    kernels.write_kv(k, v, keys, values, slots)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    with pytest.raises(RuntimeError, match="a slot outside the pool"):
        kernels.write_kv(k, v, keys, values, slots + 1)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_packed_linear_equals_f_linear(rows, dtype, tolerance):
    """The CPU path's linear layers: weights packed once for oneDNN where this CPU takes the dtype (fp32 always; bf16
    and fp16 need AVX-512 BF16 / FP16 instructions, else the weight stays as stored and F.linear runs), any batch
    size, with and without a bias, on a strided input."""
    from rung.serving.worker.ops.cpu_ops import CpuKernelOps

    ops = CpuKernelOps()
    rng = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(96, 40, generator=rng).to(dtype), torch.randn(96, generator=rng).to(dtype)
    x = torch.randn(rows, 80, generator=rng).to(dtype)[:, ::2]  # every other column: not contiguous
    packed = ops.pack_linear(weight)
    assert packed.is_mkldnn or dtype != torch.float32
    for b in (None, bias):
        expected = F.linear(x.float(), weight.float(), None if b is None else b.float())
        out = ops.linear(x, packed, b)
        assert out.shape == (rows, 96) and out.dtype == dtype
        torch.testing.assert_close(out.float(), expected, atol=tolerance * 10, rtol=tolerance)
