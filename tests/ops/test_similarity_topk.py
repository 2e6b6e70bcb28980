"""vlfast.similarity_topk: the exact top k of float64 scores, ties to the lower index, on every path;
checked against an independent float64 oracle (torch.topk over dense scores, a stable sort for ties)."""
import pytest
import torch
import torch.nn.functional as F

import vlfast

# every test with either library under the float32 GEMMs (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fp32_gemm")

IMPLS = ["reference", "torch"]


def _oracle(q, keys, k, metric):
    q64, k64 = q.double(), keys.double()
    if metric == "ip":
        s = q64 @ k64.T
    elif metric == "cosine":
        s = F.normalize(q64, dim=1) @ F.normalize(k64, dim=1).T
    else:
        s = -torch.cdist(q64, k64, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    return order, s.gather(1, order)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("n,m,d,k", [(1, 1, 3, 1), (37, 1013, 24, 7), (5, 1013, 24, 1000), (3, 50, 9, 50)])
def test_matches_float64_topk(impl, metric, n, m, d, k):
    g = torch.Generator().manual_seed(n + m + k)
    q, keys = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    index, score = vlfast.similarity_topk(q, keys, k, metric=metric, impl=impl)
    want_index, want_score = _oracle(q, keys, k, metric)
    assert index.shape == (n, k) and index.dtype == torch.int64 and score.dtype == torch.float32
    assert torch.equal(index, want_index)
    torch.testing.assert_close(score.double(), want_score, rtol=2.5e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_near_ties_and_duplicates_are_decided_exactly(dtype, metric):
    """Keys a few float32 ulps apart (the filter cannot order them) and exact duplicates (the lower index
    wins): the torch path equals the definition, in every input dtype."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(300, 32, generator=g).to(dtype)
    keys[100:110] = keys[7]  # duplicates of key 7
    base = keys[20].double()
    for j in range(200, 215):  # nudges of ~1e-7 relative on one feature
        nudged = base.clone()
        nudged[j % 32] *= 1 + (j - 207) * 1e-7
        keys[j] = nudged.to(dtype)
    q = torch.cat([keys[7:8], keys[20:21], torch.randn(6, 32, generator=g).to(dtype)]).to(dtype)
    want = vlfast.similarity_topk(q, keys, 20, metric=metric, impl="reference")
    got = vlfast.similarity_topk(q, keys, 20, metric=metric, impl="torch")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    if metric != "l2":  # the duplicates of key 7 score alike: they come out in index order
        row = got[0][0].tolist()
        dupes = [i for i in row if i == 7 or 100 <= i < 110]
        assert dupes == sorted(dupes)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_ties_past_the_filters_headroom(metric):
    """60 copies of one key, more than the torch path's top-(k + 8 + k / 8) headroom: the rows whose candidates
    overflow it take their whole mask; rows in the same block that do not keep the headroom."""
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(500, 16, generator=g)
    keys[200:260] = keys[3]
    q = torch.cat([keys[3:4] * 2, torch.randn(4, 16, generator=g), keys[3:4]])
    for k in (1, 3, 70):
        want = _oracle(q, keys, k, metric)
        got = vlfast.similarity_topk(q, keys, k, metric=metric, impl="torch")
        assert torch.equal(got[0], want[0]), (k, got[0][0, :8], want[0][0, :8])
        torch.testing.assert_close(got[1].double(), want[1], rtol=2.5e-7, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_keys_in_blocks_merge_to_the_same_top_k(impl, metric):
    """key_block splits the keys (as streaming from host memory does); duplicates straddle the blocks, so
    the merge must keep the lower index among equal scores."""
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(101, 12, generator=g)
    keys[[30, 64, 99]] = keys[2].clone()  # in other blocks than key 2 for every block size below
    q = torch.cat([keys[2:3], torch.randn(6, 12, generator=g)])
    for k in (1, 7, 50, 101):
        want = vlfast.similarity_topk(q, keys, k, metric=metric, impl=impl)
        assert torch.equal(want[0], _oracle(q, keys, k, metric)[0])
        for block in (1, 7, 13, 100, 101, 500):
            got = vlfast.similarity_topk(q, keys, k, metric=metric, key_block=block, impl=impl)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (k, block)


def test_empty_queries():
    index, score = vlfast.similarity_topk(torch.zeros(0, 4), torch.randn(9, 4), 3)
    assert index.shape == score.shape == (0, 3)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((torch.randn(2, 4), torch.randn(5, 4), 6), {}, ValueError, r"k must be an int in \[1, M=5\]"),
    ((torch.randn(2, 4), torch.randn(5, 4), 0), {}, ValueError, "k must be an int"),
    ((torch.randn(2, 4), torch.randn(5, 3), 1), {}, ValueError, "share a non-zero feature dimension"),
    ((torch.randn(2, 4), torch.randn(5, 4).double(), 1), {}, TypeError, "share a dtype"),
    ((torch.randn(2, 4), torch.full((5, 4), float("nan")), 1), {}, ValueError, "keys must be finite"),
    ((torch.randn(2, 4), torch.randn(5, 4), 1), {"metric": "dot"}, ValueError, "metric must be one of"),
    ((torch.randn(4), torch.randn(5, 4), 1), {}, ValueError, r"queries must be a 2-D tensor"),
    ((torch.randn(2, 4), torch.randn(5, 4), 1), {"key_block": -1}, ValueError, "key_block must be an int >= 0"),
    ((torch.randn(2, 4), torch.randn(5, 4), 1), {"key_block": True}, ValueError, "key_block must be an int"),
])
def test_bad_input_is_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        vlfast.similarity_topk(*args, **kwargs)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("skewed", [False, True])
def test_exact_among_candidates(metric, skewed):
    """The selection among candidate lists: per-row padded layout (PyTorch's broadcast scores, or a
    kernel's flat ones scattered into it) and, when one row has far more candidates than the rest, the
    flat layout: all equal a per-row sort by the definition's scores, then column; duplicates tie."""
    from vlfast.ops.similarity_topk import reference, torch_impl
    g = torch.Generator().manual_seed(11)
    q, keys = torch.randn(6, 9, generator=g), torch.randn(200, 9, generator=g)
    keys[50] = keys[10]
    counts = [200 if skewed and i == 2 else 12 + i for i in range(6)]
    lists = [torch.sort(torch.randperm(200, generator=g)[:c]).values for c in counts]
    lists[0] = torch.unique(torch.cat([lists[0], torch.tensor([10, 50])]))
    row = torch.cat([torch.full((len(c),), i) for i, c in enumerate(lists)])
    col = torch.cat(lists)
    k = 5
    want_i, want_s = [], []
    for i, c in enumerate(lists):
        s = reference.pair_scores(q[i].expand(len(c), -1), keys[c], metric)
        order = torch.sort(-s, stable=True).indices[:k]
        want_i.append(c[order]), want_s.append(s[order])
    for scorer in (None, torch_impl.gathered_pair_scores):
        got_i, got_s = torch_impl.exact_among(q, keys, row, col, k, metric, scorer)
        assert torch.equal(got_i, torch.stack(want_i)) and torch.equal(got_s, torch.stack(want_s))
