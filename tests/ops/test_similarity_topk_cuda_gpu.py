"""similarity_topk's CUDA filter kernel (cuda.emit over csrc/similarity_topk/) on a GPU: the emulation
tests' checks against float64 scores (similarity_topk_emit_cases.py) on real tensor cores, atomics and
streams, a retrieval-sized case, and the exact top-k built on it. Run by benchmarks/gpu_check.sh after it
builds vlfast._C; skipped without CUDA.
"""
import pytest
import torch

from vlfast._backends import extension

from . import similarity_topk_emit_cases as cases

_C, WHY_NOT = extension()
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_C is None or "similarity_topk" not in _C.OPS,
                                 reason=f"vlfast._C is not built: {WHY_NOT}" if _C is None
                                 else "vlfast._C was built without similarity_topk (rebuild it)")]


def _emit_and_check(n, m, d, dtype, capacity, context, seed=0, fractions=cases.FRACTIONS):
    from vlfast.ops.similarity_topk import cuda
    q, keys, alpha, beta = cases.random_case(n, m, d, dtype, device="cuda", seed=seed)
    threshold = cases.thresholds(q, keys, alpha, beta, fractions)
    got = cuda.emit(q, keys, alpha, beta, threshold, capacity)
    return cases.check_emit(q, keys, alpha, beta, threshold, capacity, got, context), got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (37, 300, 40), (130, 515, 100), (9, 200, 300), (1000, 5003, 72)],
                         ids=str)
def test_emit_is_the_thresholded_float64_scores_on_gpu(n, m, d, dtype, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")  # score slots start as NaN: unwritten ones would show
    capacity = m // 5 + 1
    stats, (count, _, _) = _emit_and_check(n, m, d, dtype, capacity, f"{n}x{m}x{d} {dtype}")
    if n > 3:
        assert stats["overflow"] >= 2 and stats["emitted"] > 0
        assert (count[3::7] == m).all() and (count[5::7] == 0).all()
    assert stats["band"] <= max(4, n * m // 50)


@pytest.mark.parametrize("plan", ["one-split", "one-tile-per-split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emit_row_blocks_and_key_splits_on_gpu(dtype, plan, monkeypatch):
    from vlfast.ops.codebook_lookup import splits
    if plan == "one-split":
        monkeypatch.setattr(splits, "plan", lambda row_blocks, k, device, step: (1, -(-k // step) * step))
    else:
        monkeypatch.setattr(splits, "plan", lambda row_blocks, k, device, step: (-(-k // step), step))
    stats, _ = _emit_and_check(700, 2000, 24, dtype, 300, f"{plan} {dtype}", seed=1)
    assert stats["overflow"] > 0 and stats["emitted"] > 10000


def test_emit_every_key_count_only_and_streams():
    """-inf thresholds with room for all: every key once; capacity 0 counts only, with the same counts;
    a side stream gives the same counts as the default one."""
    from vlfast.ops.similarity_topk import cuda
    n, m = 300, 1000
    q, keys, alpha, beta = cases.random_case(n, m, 33, torch.bfloat16, device="cuda", seed=2)
    everything = torch.full((n,), -float("inf"), device="cuda")
    got = cuda.emit(q, keys, alpha, beta, everything, m + 3)
    cases.check_emit(q, keys, alpha, beta, everything, m + 3, got, "all keys")
    assert (got[0] == m).all()
    assert torch.equal(got[1][:, :m].sort(dim=1).values, torch.arange(m, dtype=torch.int32, device="cuda").expand(n, m))
    threshold = cases.thresholds(q, keys, alpha, beta)
    count0, cols0, _ = cuda.emit(q, keys, alpha, beta, threshold, 0)
    assert cols0.shape == (n, 0)
    full = cuda.emit(q, keys, alpha, beta, threshold, m)
    assert torch.equal(count0, full[0])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = cuda.emit(q, keys, alpha, beta, threshold, m)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side[0], full[0])


def test_emit_never_touches_rows_or_keys_past_the_ends():
    from vlfast._cuda_args import common_args
    from vlfast.ops.codebook_lookup.cuda import kernel_rows
    ext = _C
    n, m, d, cap, extra = 200, 300, 16, 320, 60
    q, keys, alpha, beta = cases.random_case(n + extra, m + extra, d, torch.bfloat16, device="cuda", seed=3)
    q, keys = kernel_rows(q), kernel_rows(keys)
    threshold = torch.full((n + extra,), -float("inf"), device="cuda")
    count = torch.zeros(n + extra, dtype=torch.int32, device="cuda")
    count[n:] = -7
    cols = torch.full((n + extra, cap), -7, dtype=torch.int32, device="cuda")
    scores = torch.full((n + extra, cap), -7.0, device="cuda")
    ext.similarity_topk_emit(q=q.data_ptr(), keys=keys.data_ptr(), alpha=alpha.data_ptr(), beta=beta.data_ptr(),
                             threshold=threshold.data_ptr(), count=count.data_ptr(), cols=cols.data_ptr(),
                             scores=scores.data_ptr(), work=0, work_size=0, n=n, m=m, d=d, stride_q=q.stride(0),
                             stride_k=keys.stride(0), capacity=cap, keys_per_split=128, splits=3, **common_args(ext, q))
    assert (count[:n] == m).all() and (count[n:] == -7).all()
    assert (cols[n:] == -7).all() and (scores[n:] == -7).all() and (cols[:, m:] == -7).all()
    assert torch.equal(cols[:n, :m].sort(dim=1).values, torch.arange(m, dtype=torch.int32, device="cuda").expand(n, m))


def test_emit_at_retrieval_size():
    """N 4096 x M 100000 x D 512 bf16, thresholds letting 0.01 % to 1 % of keys through (and a few rows
    none, all, or half): the filter's target regime, checked against float64 in row chunks."""
    fractions = (1e-4, 1e-3, 1e-2, 3e-3, 0.0, 1e-4, 5e-4, 1e-3, 2e-3, 1e-2) * 10 + (None, 0.5)
    stats, (count, _, _) = _emit_and_check(4096, 100000, 512, torch.bfloat16, 2048, "4096x100000x512 bf16",
                                           seed=5, fractions=fractions)
    assert stats["overflow"] == int((count > 2048).sum()) > 0  # the -inf and 50 % rows
    assert stats["band"] <= 4096 * 10


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_exact_top_k_on_the_cuda_filter(metric, dtype):
    """cuda.similarity_topk (filter.py's search over cuda.emit) is the definition's top k exactly."""
    from vlfast.ops.similarity_topk import cuda, reference
    g = torch.Generator(device="cuda").manual_seed(6)
    q = torch.randn(500, 72, device="cuda", generator=g).to(dtype)
    keys = torch.randn(9000, 72, device="cuda", generator=g).to(dtype)
    keys[100:110] = keys[7]  # exact ties: the lower index first
    q[:5] = keys[7]
    index, score = cuda.similarity_topk(q, keys, 10, metric)
    want_index, want_score = reference.similarity_topk(q, keys, 10, metric)
    assert torch.equal(index, want_index)
    assert torch.equal(score, want_score)


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [1, 77, 300])
def test_pair_scores_are_the_definitions_bits_on_gpu(d, dtype, metric):
    """cuda.pair_scores (csrc/similarity_topk/pair_scores.cu) is reference.pair_scores bit for bit:
    elements over 24 binades (l2's squares round, an fma would show), a zero query row (cosine 0),
    random pairs. ip and l2 also against the CPU's sums; cosine on one device (sqrt's last bit is
    the device's)."""
    from vlfast.ops.similarity_topk import cuda, reference
    g = torch.Generator(device="cuda").manual_seed(d)
    n, m, p = 300, 5000, 20000
    q = (torch.randn(n, d, device="cuda", generator=g)
         * 2.0 ** torch.randint(-12, 12, (n, d), device="cuda", generator=g)).to(dtype)
    keys = (torch.randn(m, d, device="cuda", generator=g)
            * 2.0 ** torch.randint(-12, 12, (m, d), device="cuda", generator=g)).to(dtype)
    q[0] = 0
    row = torch.randint(0, n, (p,), device="cuda", generator=g)
    col = torch.randint(0, m, (p,), device="cuda", generator=g)
    row[:10] = 0
    got = cuda.pair_scores(q, keys, row, col, metric)
    assert got.dtype == torch.float64 and got.shape == (p,)
    want = reference.pair_scores(q[row], keys[col], metric)
    assert torch.equal(got, want), f"{int((got != want).sum())} of {p} differ"
    if metric == "cosine":
        assert (got[:10] == 0).all()
    else:
        assert torch.equal(got.cpu(), reference.pair_scores(q[row].cpu(), keys[col].cpu(), metric))


def test_pair_scores_match_the_triton_kernel_on_gpu():
    """The two GPU paths' pair scorers agree bit for bit (both are the definition's)."""
    pytest.importorskip("triton")
    from vlfast.ops.similarity_topk import cuda, triton
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(100, 512, device="cuda", generator=g).bfloat16()
    keys = torch.randn(2000, 512, device="cuda", generator=g).bfloat16()
    row = torch.randint(0, 100, (50000,), device="cuda", generator=g)
    col = torch.randint(0, 2000, (50000,), device="cuda", generator=g)
    for metric in ("ip", "cosine", "l2"):
        assert torch.equal(cuda.pair_scores(q, keys, row, col, metric), triton.pair_scores(q, keys, row, col, metric))
