"""The benches' float64 oracles are independent of vlfast's code and say what they promise."""
import torch

from vlfast.bench import bench_codebook_lookup as cb


def _brute_force(z, e, metric):
    best = []
    for row in z.double():
        if metric == "l2":
            d = [float(((row - code.double()) ** 2).sum()) for code in e]
        else:
            d = [1 - float(row @ code.double() / (row.norm() * code.double().norm())) for code in e]
        best.append(min(range(len(d)), key=lambda k: (d[k], k)))  # lowest index among equal distances
    return torch.tensor(best)


def test_codebook_oracle_is_the_float64_argmin_with_lowest_index_ties():
    g = torch.Generator().manual_seed(1)
    e = torch.randn(37, 5, generator=g)
    e[30] = e[3]  # duplicate codes: the oracle must name the lower index
    z = torch.cat([torch.randn(300, 5, generator=g), e[3:4] + 1e-3, e[30:31]])
    for metric in ("l2", "cosine"):
        index, dist = cb.oracle(z, e, metric)
        assert torch.equal(index, _brute_force(z, e, metric)), metric
        assert index[-1] == 3 and dist.dtype == torch.float64
    index, dist = cb.oracle(z, e, "l2")
    assert torch.allclose(dist, ((z.double() - e.double()[index]) ** 2).sum(1), rtol=1e-12, atol=1e-12)


def test_lm_head_oracle_in_chunks_equals_one_float64_autograd_pass(monkeypatch):
    from vlfast.bench import bench_linear_cross_entropy as lce
    g = torch.Generator().manual_seed(2)
    h, w = torch.randn(29, 7, generator=g), torch.randn(13, 7, generator=g)
    t = torch.randint(0, 13, (29,), generator=g)
    t[::4] = lce.IGNORE
    monkeypatch.setattr(lce, "ORACLE_ELEMENTS", 13 * 5)  # chunks of 5 rows
    got = lce.oracle(h, w, t)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(h64 @ w64.T, t, ignore_index=lce.IGNORE)
    loss.backward()
    for name, want in (("loss", loss.detach()), ("d_hidden", h64.grad), ("d_weight", w64.grad)):
        assert torch.allclose(got[name], want, rtol=1e-12, atol=1e-14), name


def test_contrastive_oracle_matches_textbook_losses_and_keeps_tiny_losses_accurate():
    import torch.nn.functional as F

    from vlfast.bench import bench_clip_loss as cl
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(9, 4, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64)
    s, bias = torch.tensor(2.5, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    z = s * a @ b.T
    labels = torch.arange(9)
    textbook = (F.cross_entropy(z, labels) + F.cross_entropy(z.T, labels)) / 2
    assert torch.allclose(cl.oracle(a, b, s, None, "softmax"), textbook, rtol=1e-13)
    signs = 2 * torch.eye(9, dtype=torch.float64) - 1
    assert torch.allclose(cl.oracle(a, b, s, bias, "sigmoid"), -F.logsigmoid(signs * (z + bias)).sum() / 9, rtol=1e-13)
    # Near-perfect pairs: each loss term is about exp(-margin); the margin form keeps its digits.
    e = torch.eye(6, dtype=torch.float64)
    scale = torch.tensor(40.0, dtype=torch.float64)
    want = 5 * torch.exp(torch.tensor(-40.0, dtype=torch.float64))  # per row: log1p(5 e^-40)
    assert torch.allclose(cl.oracle(e, e, scale, None, "softmax"), want, rtol=1e-12)


def test_attention_plain_masks_agree_with_vlfast_masks_and_oracle_with_sdpa():
    """The bench's mask rules (plain index arithmetic) against vlfast.masks for every kind the bench runs, on a
    small odd grid; its explicit float64 softmax against SDPA's math path (GQA, dense mask, an empty row)."""
    from vlfast.bench import bench_attention as A
    from vlfast.bench.common import Case
    cpu = torch.device("cpu")
    kinds = [("causal", {}), ("prefix", {"prefix": 5}), ("text", {}), ("dalle-row", {"text": 3, "grid": 4}),
             ("dalle-column", {"text": 3, "grid": 4}), ("dalle-conv", {"text": 3, "grid": 4})]
    for kind, params in kinds:
        case = A._case("t", 3, 4, 19, 8, kind, torch.float64, h_kv=2, accuracy=True, **params)
        x = A.make_inputs(case, cpu)  # raises if the plain mask and vlfast's disagree
        mask = x.mask.to_dense(19, 19, cpu)[:, None]
        assert torch.equal(mask.expand_as(x.dense), x.dense), kind
        dense = x.dense.clone()
        dense[..., 7, :] = False  # a query with no key: 0 by vlfast's convention
        out = A.oracle(x.q.detach(), x.k.detach(), x.v.detach(), dense, 0.3)
        want = torch.nn.functional.scaled_dot_product_attention(
            x.q.detach(), x.k.detach(), x.v.detach(), attn_mask=dense, scale=0.3, enable_gqa=True)
        keep = dense.any(-1, keepdim=True).expand_as(out)
        torch.testing.assert_close(out[keep], want[keep], rtol=1e-12, atol=1e-12)
        assert (out[~keep] == 0).all(), kind


def test_gpu_tests_codebook_oracle_is_brute_force_with_lowest_index_ties():
    """tests/ops/codebook_lookup_cases.float64_argmin (the GPU tests' oracle) on duplicate codes
    and a constant codebook, against brute force."""
    from tests.ops import codebook_lookup_cases as cases
    g = torch.Generator().manual_seed(3)
    z, e = torch.randn(301, 7, generator=g), torch.randn(53, 7, generator=g)
    e[[4, 20, 52]] = e[30].clone()
    z[:9] = e[30].clone()
    for metric in ("l2", "cosine"):
        got = cases.float64_argmin(z, e, metric, rows=64)
        torch.testing.assert_close(got, _brute_force(z, e, metric), rtol=0, atol=0)
    assert (cases.float64_argmin(z, e, "l2")[:9] == 4).all()
    assert (cases.float64_argmin(z, e[:1].expand(9, 7), "l2") == 0).all()


def test_compiled_peer_compiles_every_shape_rather_than_falling_back_to_eager():
    """Past dynamo's default recompile limit (8) a compiled peer would quietly run eagerly under its
    compiled name: the bench's wrapper keeps compiling (and would raise, not fall back)."""
    from torch._dynamo.utils import counters

    from vlfast.bench.common import compiled
    torch._dynamo.reset()
    counters.clear()
    square = compiled(lambda x: x * x + 1, backend="eager")
    for n in range(1, 13):
        x = torch.randn(n)
        torch.testing.assert_close(square(x), x * x + 1)
    assert counters["stats"]["unique_graphs"] == 12


def test_cpu_peak_bytes_sees_a_temporary_that_is_freed_before_the_call_returns():
    from vlfast.bench.common import cpu_peak_bytes
    a = torch.randn(300, 200)
    logits_bytes = 300 * 300 * 4

    def dense():
        return (a @ a.T).sum()  # the (300, 300) product is freed before returning

    def chunked():
        return sum((a[i:i + 30] @ a.T).sum() for i in range(0, 300, 30))

    assert logits_bytes <= cpu_peak_bytes(dense) < logits_bytes + 4096
    assert cpu_peak_bytes(chunked) < logits_bytes / 4
