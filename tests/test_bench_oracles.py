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
