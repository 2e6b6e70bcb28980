"""The half-precision d_weight accumulator of the fused linear cross-entropy (weight_grad.py): its
error against the float64 sum, its scale's bounds, and the result written over its own memory."""
import math

import pytest
import torch

from vlfast.ops.linear_cross_entropy import weight_grad as wg

pytestmark = pytest.mark.triton


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")  # the buffer starts as NaN: the first chunk must write it all


def _chunks(count, rows, v, h, dtype, g_scale=1e-3, h_scale=1.0, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    return [((torch.randn(rows, v, generator=g, dtype=torch.float64) * g_scale).to(dtype),
             (torch.randn(rows, h, generator=g, dtype=torch.float64) * h_scale).to(dtype)) for _ in range(count)]


def _accumulate(chunks, dtype, scale):
    v, h = chunks[0][0].shape[1], chunks[0][1].shape[1]
    acc = wg.ScaledHalfAccumulator(v, h, dtype, torch.device("cpu"), scale)
    for g, x in chunks:
        acc.add(g, x)
    return acc, acc.result()


def _exact(chunks):
    return sum(g.double().T @ x.double() for g, x in chunks)


def _err(x, exact):
    return float((x.double() - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("dtype,factor", [(torch.bfloat16, 2), (torch.float16, 12)], ids=str)
def test_many_chunks_cost_about_one_rounding(dtype, factor):
    """64 chunks. bfloat16 weights: within 2x of rounding the exact sum once, where bfloat16 partial
    sums are ~8x. float16 weights: the accumulator has no bits to spare over the result, so its
    partial sums' roundings add up (~sqrt(64) x), still below one bfloat16 rounding."""
    chunks = _chunks(64, 8, 96, 48, dtype)
    rows_weight = torch.full((64 * 8,), 1e-3)
    scale = wg.scale_for(torch.cat([x for _, x in chunks]), rows_weight, 0.0, None)
    _, got = _accumulate(chunks, dtype, scale)
    exact = _exact(chunks)
    assert got.dtype == dtype and got.shape == (96, 48)
    once = _err(exact.to(dtype), exact)
    bf16_partials = torch.zeros(96, 48, dtype=torch.bfloat16)
    for g, x in chunks:
        bf16_partials = (bf16_partials.double() + g.double().T @ x.double()).bfloat16()
    assert _err(got, exact) <= factor * once, (_err(got, exact), once)
    if dtype == torch.bfloat16:
        assert _err(bf16_partials, exact) > 4 * once  # what this accumulator exists to avoid
    else:
        assert _err(got, exact) < _err(exact.bfloat16(), exact)


@pytest.mark.parametrize("g_scale,h_scale", [(1e-9, 1.0), (1e-4, 300.0), (1.0, 1e-6)])
def test_extreme_magnitudes_keep_their_precision(g_scale, h_scale):
    """Tiny gradients (mean over many rows) would be float16 subnormals unscaled; large ones overflow."""
    chunks = _chunks(6, 16, 40, 24, torch.bfloat16, g_scale, h_scale)
    hidden = torch.cat([x for _, x in chunks])
    scale = wg.scale_for(hidden, torch.full((hidden.shape[0],), g_scale), 0.0, None)
    _, got = _accumulate(chunks, torch.bfloat16, scale)
    exact = _exact(chunks)
    assert torch.isfinite(got).all()
    assert _err(got, exact) <= 2 * _err(exact.bfloat16(), exact) + 1e-6


def test_scale_is_a_power_of_two_within_the_bound():
    hidden = torch.randn(50, 30).bfloat16() * 7
    w = torch.rand(50) * 0.1
    scale = float(wg.scale_for(hidden, w, 0.0, None))
    bound = float(hidden.abs().max()) * float(w.sum())
    assert math.log2(scale) == int(math.log2(scale))
    assert wg.TARGET / 2 < scale * bound <= wg.TARGET
    assert float(wg.scale_for(hidden, torch.zeros(50), 0.0, None)) == 2.0 ** 100  # no gradient: any scale
    with_z = float(wg.scale_for(hidden, w, 1e-2, torch.tensor(50.0)))
    assert with_z * bound * (1 + 2 * 1e-2 * 50) <= wg.TARGET


@pytest.mark.parametrize("softcap,bias", [(0.0, False), (0.0, True), (5.0, True)])
def test_lse_bound_covers_every_row(softcap, bias):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, 32, generator=g).bfloat16() * 3
    weight = torch.randn(70, 32, generator=g).bfloat16()
    b = torch.randn(70, generator=g).bfloat16() * 4 if bias else None
    z = hidden.double() @ weight.double().T + (b.double() if bias else 0)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, dim=1)
    assert float(wg.lse_bound(hidden, weight, b, softcap)) >= float(lse.abs().max())


def test_result_reuses_the_accumulator_memory():
    chunks = _chunks(2, 4, 10, 6, torch.bfloat16)
    acc, got = _accumulate(chunks, torch.bfloat16, torch.tensor(1.0))
    assert got.untyped_storage().data_ptr() == acc.acc.untyped_storage().data_ptr()


def test_no_chunks_is_an_empty_sum():
    acc = wg.ScaledHalfAccumulator(5, 3, torch.bfloat16, torch.device("cpu"), torch.tensor(4.0))
    assert torch.equal(acc.result(), torch.zeros(5, 3, dtype=torch.bfloat16))
