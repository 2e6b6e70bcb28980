"""similarity_topk(impl="triton") in Triton's interpreter: the emit kernel plus filter.py's certification
give exactly the float64 top k (ties to the lower index) on odd shapes, every dtype and metric, with the
sampled thresholds, near-ties, duplicates, and rows that must fall back (overflowing buffers, thresholds
set too high). The compiled kernel: test_similarity_topk_compiles.py (sm_80 / sm_90a) and the GPU tests."""
import pytest
import torch

import vlfast
from vlfast.ops.similarity_topk import filter as topk_filter

from .test_similarity_topk import _oracle

pytestmark = pytest.mark.triton
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
METRICS = ["ip", "cosine", "l2"]


def _stats():
    from vlfast.ops.similarity_topk import triton as topk_triton
    return dict(topk_triton.last_call)


def _assert_exact(q, keys, k, metric, oracle=True, **kwargs):
    index, score = vlfast.similarity_topk(q, keys, k, metric=metric, impl="triton", **kwargs)
    want_index, want_score = vlfast.similarity_topk(q, keys, k, metric=metric, impl="reference")
    assert index.dtype == torch.int64 and score.dtype == torch.float32 and index.shape == (q.shape[0], k)
    assert torch.equal(index, want_index), (metric, k, (index != want_index).nonzero()[:5])
    assert torch.equal(score, want_score)
    if oracle:  # the definition, independently (its float64 sums in another order: not for near-ties)
        assert torch.equal(index, _oracle(q, keys, k, metric)[0])
    return _stats()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("n,m,d,k", [(1, 1, 3, 1), (37, 1013, 24, 7), (5, 1013, 100, 1000), (3, 50, 9, 50),
                                     (130, 515, 40, 10)])
def test_matches_the_float64_top_k(dtype, metric, n, m, d, k):
    """One key to k = M; D = 100 takes the kernel's feature loop; 130 rows are several row blocks, and
    the keys several splits (the interpreter plans for 4 SMs)."""
    g = torch.Generator().manual_seed(n * m + d)
    q, keys = torch.randn(n, d, generator=g).to(dtype), torch.randn(m, d, generator=g).to(dtype)
    stats = _assert_exact(q, keys, k, metric)
    assert stats["fallback"] == 0 and stats["rescored"] >= n * k


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_sampled_thresholds(dtype, metric, monkeypatch):
    """A sample of every 8th key sets the thresholds (as for M >= 4096 keys by default), scored in blocks
    of rows: still exact, and on random data no row needs the fallback."""
    monkeypatch.setattr(topk_filter, "SAMPLE_MIN", 64)
    monkeypatch.setattr(topk_filter, "SAMPLE_FRACTION", 8)
    monkeypatch.setattr(topk_filter, "SAMPLE_SCORES", 376 * 7)  # the sample scored 7 rows at a time
    assert topk_filter.sample_plan(3001, 10)[0] == 8
    g = torch.Generator().manual_seed(7)
    q, keys = torch.randn(40, 32, generator=g).to(dtype), torch.randn(3001, 32, generator=g).to(dtype)
    for k in (1, 10, 100):
        stats = _assert_exact(q, keys, k, metric)
        assert stats["fallback"] == 0, (k, stats)
        assert stats["rescored"] < 40 * (k + 64), stats  # the band is narrow: few beyond k per row


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_near_ties_and_duplicates(dtype, metric):
    """Keys a few float32 ulps apart (the kernel cannot order them) and exact duplicates (lower index first)."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(300, 32, generator=g).to(dtype)
    keys[100:110] = keys[7]
    base = keys[20].double()
    for j in range(200, 215):
        nudged = base.clone()
        nudged[j % 32] *= 1 + (j - 207) * 1e-7
        keys[j] = nudged.to(dtype)
    q = torch.cat([keys[7:8], keys[20:21], torch.randn(6, 32, generator=g).to(dtype)])
    for k in (1, 5, 20):
        _assert_exact(q, keys, k, metric, oracle=False)


@pytest.mark.parametrize("metric", METRICS)
def test_rows_past_capacity_fall_back(metric):
    """200 copies of one key: the rows near it emit more pairs than their buffers hold (capacity k + 64),
    are counted as overflowing and take the torch path; the other rows stay on the kernel's."""
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(700, 16, generator=g)
    keys[300:500] = keys[3]
    q = torch.cat([keys[3:4] * 2, torch.randn(4, 16, generator=g), keys[3:4]])
    assert topk_filter.capacity(700, 1) == 65
    stats = _assert_exact(q, keys, 1, metric)
    assert 2 <= stats["fallback"] < q.shape[0], stats


def test_thresholds_too_high_or_too_low_stay_exact(monkeypatch):
    """Certification does not trust the thresholds: set above every score, no row has k candidates and
    all fall back; set to -inf, every key is emitted and rows overflow their buffers (M > capacity)."""
    g = torch.Generator().manual_seed(6)
    q, keys = torch.randn(9, 20, generator=g), torch.randn(400, 20, generator=g)
    for value, expect in ((float("inf"), 9), (-float("inf"), 9)):
        monkeypatch.setattr(topk_filter, "thresholds",
                            lambda rows, *args, v=value: torch.full((rows.shape[0],), v, device=rows.device))
        assert _assert_exact(q, keys, 3, "ip")["fallback"] == expect


def test_strided_views_and_key_blocks():
    """Inputs whose features are not contiguous are copied once; key blocks merge exactly."""
    g = torch.Generator().manual_seed(8)
    q = torch.randn(30, 11, generator=g).T  # (11, 30), feature stride 11
    keys = torch.randn(101, 60, generator=g)[:, ::2]  # (101, 30), feature stride 2
    keys[[40, 90]] = keys[5].clone()
    for k in (1, 9, 101):
        _assert_exact(q, keys, k, "cosine")
        _assert_exact(q, keys, k, "l2", key_block=37)


def test_float64_is_refused_by_name():
    with pytest.raises(vlfast.ImplUnavailableError, match="float64"):
        vlfast.similarity_topk(torch.randn(2, 4).double(), torch.randn(5, 4).double(), 1, impl="triton")


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_pair_score_kernel_has_the_definitions_bits(dtype, metric):
    """The candidates' float64 scores: bit for bit reference.pair_scores (sums in feature order, no fused
    multiply-adds), zero rows included (cosine 0), on D = 1 and an odd D."""
    from vlfast.ops.similarity_topk import reference
    from vlfast.ops.similarity_topk import triton as topk_triton
    g = torch.Generator().manual_seed(9)
    for d in (1, 77):
        q, keys = torch.randn(13, d, generator=g).to(dtype), torch.randn(29, d, generator=g).to(dtype)
        q[3] = 0
        row = torch.randint(0, 13, (301,), generator=g)
        col = torch.randint(0, 29, (301,), generator=g)
        got = topk_triton.pair_scores(q, keys, row, col, metric)
        assert torch.equal(got, reference.pair_scores(q[row], keys[col], metric))
