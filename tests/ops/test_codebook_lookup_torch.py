"""impl="torch" (vlfast/ops/codebook_lookup/torch_impl.py, the CPU fast path): indices equal the
float64 argmin exactly (lowest index on ties), against an independent torch.cdist oracle and the
definition (reference.spec_lookup), including near-ties, duplicate codes and several row chunks."""
import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast.ops.codebook_lookup import certify, torch_impl

from .codebook_lookup_cases import assert_exact, planted_near_ties, random_case

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# every test with either library under the float32 GEMMs (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fp32_gemm")


def _cdist_argmin(z: torch.Tensor, e: torch.Tensor, metric: str) -> torch.Tensor:
    """Independent oracle: float64 cdist (l2) or normalised dot products (cosine); argmin's lowest index."""
    z64, e64 = z.double(), e.double()
    if metric == "l2":
        return torch.cdist(z64, e64).argmin(dim=1)
    return (-(F.normalize(z64, dim=1) @ F.normalize(e64, dim=1).T)).argmin(dim=1)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,d", [(1, 1, 8), (97, 33, 72), (1025, 300, 64), (5, 1000, 3), (131, 77, 200)])
def test_torch_matches_float64(n, k, d, dtype, metric):
    z, e = random_case(n, k, d, dtype)
    index, dist = vlfast.codebook_lookup(z, e, metric=metric, impl="torch")
    assert_exact(z, e, metric, index, dist, f"torch {dtype} {metric}")
    assert torch.equal(index, _cdist_argmin(z, e, metric))


@pytest.mark.parametrize("d", [64, 160])  # l2's beta as a GEMM feature / added by the GEMM (BLAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_planted_near_ties(dtype, d):
    """Gaps 1e-2 .. 1e-7 between the two nearest codes: the float32 scan cannot decide the small ones;
    the certified fallback must."""
    z, e, _ = planted_near_ties(512, d, dtype)
    index, dist = vlfast.codebook_lookup(z, e, impl="torch")
    assert_exact(z, e, "l2", index, dist, f"near ties {dtype}")
    assert torch.equal(index, _cdist_argmin(z, e, "l2"))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_duplicate_codes_pick_the_lowest_index(dtype, metric):
    z, e = random_case(200, 64, 16, dtype)
    e[40] = e[7]
    e[63] = e[7]
    e[10] = 2 * e[3]  # same direction: a cosine tie
    z[:50] = e[7]
    assert torch.equal(vlfast.codebook_lookup(z[:50], e, metric=metric, impl="torch")[0], _cdist_argmin(z[:50], e, metric))
    z[50:100] = (e[3].float() * 0.5).to(dtype)
    index, dist = vlfast.codebook_lookup(z, e, metric=metric, impl="torch")
    assert_exact(z, e, metric, index, dist, f"duplicates {dtype} {metric}")
    assert (index[:50] == 7).all()
    if metric == "cosine":
        assert (index[50:100] == 3).all()


def test_large_offset_cancellation():
    """A common offset of 100: ||e||^2 - 2 z.e cancels badly in float32; the certificate must notice."""
    z, e = random_case(300, 200, 32, torch.float32, offset=100.0)
    index, dist = vlfast.codebook_lookup(z, e, impl="torch")
    assert_exact(z, e, "l2", index, dist, "offset 100")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_small_chunks_give_the_same_result(metric, monkeypatch):
    z, e = random_case(1025, 130, 24, torch.float32)
    whole = vlfast.codebook_lookup(z, e, metric=metric, impl="torch")
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 7 * 130)  # chunks of 7 rows, uneven last chunk
    chunked = vlfast.codebook_lookup(z, e, metric=metric, impl="torch")
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert_exact(z, e, metric, *chunked, "chunked")


def test_batched_leading_dims_and_float64():
    z, e = random_case(2 * 3 * 5, 40, 8, torch.float64)
    index, dist = vlfast.codebook_lookup(z.view(2, 3, 5, 8), e, impl="torch")
    assert index.shape == (2, 3, 5)
    assert_exact(z, e, "l2", index.reshape(-1), dist.reshape(-1), "float64")


def test_non_finite_input_raises():
    z, e = random_case(10, 5, 4, torch.float32)
    z[3, 1] = float("nan")
    with pytest.raises(ValueError, match="z must be finite; row 3"):
        vlfast.codebook_lookup(z, e, impl="torch")
    z, e = random_case(10, 5, 4, torch.float32)
    e[2, 0] = float("inf")
    with pytest.raises(ValueError, match="codebook must be finite"):
        vlfast.codebook_lookup(z, e, impl="torch")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunked", [True, False], ids=["chunks", "direct"])
def test_row_norms_in_chunks_give_vector_norms_bits(dtype, chunked, monkeypatch):
    """certify.row_norms64 converts rows in scratch chunks on a CPU (uneven last chunk), or reads short
    rows directly: the bits of vector_norm over a float64 copy; a row with inf or NaN has a non-finite
    norm (the finite flag)."""
    from vlfast.ops.codebook_lookup import certify
    if chunked:
        monkeypatch.setattr(certify, "NORM_CHUNK_ELEMENTS", 7 * 40)  # chunks of 7 rows of 40
    else:
        monkeypatch.setattr(certify, "DIRECT_NORM_MAX_D", 40)
    x = (torch.randn(97, 40, dtype=torch.float64) * 30).to(dtype)
    want = torch.linalg.vector_norm(x.double(), dim=1)
    assert torch.equal(certify.row_norms64(x, "test"), want)
    for bad in (float("inf"), float("nan")):
        y = x.clone()
        y[60, 3] = bad
        terms = certify.codebook_terms(y, "l2")
        assert not bool(terms["finite"]) and bool(certify.codebook_terms(x, "l2")["finite"])


@pytest.mark.parametrize("d", [8, torch_impl.ADDMM_MIN_D])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_scan_operand_is_formed_in_float32(dtype, d, fp32_gemm):
    """The l2 scan's operand -2 e (with beta as its last feature in the "feature" form) is float32
    arithmetic on the codes: -2 e in float16 would be -inf past 32768 (the exact re-score would then
    have to catch every such row)."""
    from vlfast.ops.codebook_lookup import certify
    e = torch.randn(30, d, dtype=torch.float64).mul(3e4).clamp(-6e4, 6e4).to(dtype)
    assert float(e.abs().max()) > 16384
    terms = certify.codebook_terms(e, "l2")
    form = torch_impl._form("l2", dtype, d)
    assert form == ("bf16_l2" if dtype == torch.bfloat16 else "feature" if d == 8 and fp32_gemm == "blas" else "bias")
    codes = torch_impl._codes(e, terms["alpha"], terms["beta"], form)
    assert torch.equal(codes[:, :d], e.float() * -2)
    assert codes.shape[1] == d + (form == "feature")
    if form == "feature":
        assert torch.equal(codes[:, d], terms["beta"])


def test_auto_on_cpu_picks_torch(monkeypatch):
    called = []
    monkeypatch.setitem(vlfast.ops.codebook_lookup._FORWARD, "torch",
                        lambda *args: called.append(1) or torch_impl.lookup(*args))
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    vlfast.codebook_lookup(torch.randn(5, 8), torch.randn(3, 8))
    assert called


@pytest.mark.parametrize("d", [1, 3, 64, 257])
def test_ordered_row_sums_are_the_definitions_ordered_sum_bit_for_bit(d):
    """The vectorised CPU sum (a running sum along each row) adds in the definition's order: the same
    bits as the per-feature loop, on terms of mixed signs and magnitudes where order changes the result."""
    from vlfast.ops.codebook_lookup import reference
    g = torch.Generator().manual_seed(d)
    x = torch.randn(300, d, dtype=torch.float64, generator=g) * torch.logspace(-8, 8, d, dtype=torch.float64)
    loop = reference._ordered_sum(x[:, k] for k in range(d))
    assert torch.equal(reference.ordered_row_sums(x), loop)
    if d > 3:  # the order matters on these terms: a different order gives other bits
        assert not torch.equal(x.flip(1).cumsum(1)[:, -1], loop)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_chosen_distances_are_the_definitions_bits(dtype, metric, monkeypatch):
    """The CPU distances (scratch buffers, chunks of rows) give spec_distances' bits, rounded once to
    float32: zero rows and codes included, over several chunks and a short last one."""
    from vlfast.ops.codebook_lookup import reference
    monkeypatch.setattr(reference, "CPU_PAIR_CHUNK_ELEMENTS", 7 * 37)
    g = torch.Generator().manual_seed(3)
    z = (torch.randn(53, 37, generator=g) * 5 + 2).to(dtype)
    e = torch.randn(11, 37, generator=g).to(dtype)
    z[4], e[2] = 0, 0
    index = torch.randint(0, 11, (53,), generator=g)
    index[4:7] = 2
    got = reference.chosen_distances(z, e, index, metric)
    assert got.dtype == torch.float32
    assert torch.equal(got, reference.spec_distances(z, e[index], metric).float())


@pytest.mark.parametrize("k", [1, 2, 31, 32, 33, 70, 1024, 1057])
def test_best_two_is_the_minimum_its_index_and_the_runner_up(k):
    """The two-level (lane) minimum against a sort: best, second and, on rows without a tie at the
    minimum, the index; rows with a tie report second == best (so the certifier re-scores them)."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(257, k, generator=g)
    scores[:40] = torch.randint(0, 4, (40, k), generator=g).float()  # many exact ties
    scores[40, -1] = -10.0  # a winner among the last K mod 32 codes (lanes of one code) where there are some
    torch_impl._best_two(torch.randn(300, k + 5, generator=g))  # the scratch buffers held from another shape
    best, second, index = torch_impl._best_two(scores.clone())
    ordered = scores.sort(dim=1).values
    assert torch.equal(best, ordered[:, 0])
    assert torch.equal(second, ordered[:, 1] if k > 1 else torch.full((257,), float("inf")))
    unique = second > best
    assert torch.equal(index[unique], scores.argmin(dim=1)[unique])
    assert torch.equal(scores.gather(1, index[:, None])[:, 0], best)  # a tied row still names a minimal code
    if k > 1:
        assert (~unique[:40]).any() and unique[40:].all()


@pytest.mark.parametrize("offset", [0.0, 100.0], ids=["centred", "offset100"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scan_scores_lie_within_the_certified_error(dtype, metric, offset):
    """The scan's best and second scores are within eps_i (the bound certification trusts, with beta
    summed inside the float32 GEMM for l2) of the float64 scores of the same codes, also where ||e||^2
    dominates (an offset of 100); the check the certifier's soundness rests on."""
    from vlfast.ops.codebook_lookup import certify
    z, e = random_case(700, 300, 48, dtype, offset=offset)
    terms = certify.codebook_terms(e, metric)
    best, second, index = torch_impl._scan(z, e, terms["alpha"], terms["beta"], metric=metric)
    in_dot = metric == "l2" and dtype != torch.bfloat16
    eps = certify.score_error(torch.linalg.vector_norm(z, dim=1, dtype=torch.float64), terms, z.shape[1],
                              torch_impl.dot_error(z.shape[1] + in_dot), metric, beta_in_dot=in_dot)
    z64, e64 = z.double(), e.double()
    if metric == "l2":
        exact = (e64 ** 2).sum(1)[None, :] - 2 * z64 @ e64.T
    else:
        exact = -(z64 @ e64.T) / e64.norm(dim=1)[None, :]
    chosen = exact.gather(1, index[:, None])[:, 0]
    runner_up = exact.scatter(1, index[:, None], float("inf")).amin(dim=1)
    assert ((best.double() - chosen).abs() <= eps).all()
    assert ((second.double() - runner_up).abs() <= eps).all()
    assert (eps < 1e-2 * (exact.abs().amax(dim=1) + 1)).all()  # and the bound is not vacuous


def test_eager_calls_skip_the_op_boundary_and_match_it():
    """Plain eager calls run the op's body without the torch.library dispatch; through the op (a function
    mode forces it) the indices and distances are the same bits."""
    g = torch.Generator().manual_seed(11)
    z, e = torch.randn(3, 41, 24, generator=g), torch.randn(70, 24, generator=g)
    with torch.profiler.profile() as prof:
        eager = vlfast.codebook_lookup(z, e, impl="torch")
    assert not any(ev.name.startswith("vlfast::") for ev in prof.events())

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.profiler.profile() as prof, Passthrough():
        through_op = vlfast.codebook_lookup(z, e, impl="torch")
    assert "vlfast::codebook_lookup" in {ev.name for ev in prof.events()}
    for got, want in zip(eager, through_op):
        assert torch.equal(got, want)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rescore_from_the_scan_is_the_exact_argmin(dtype, metric):
    """_rescore narrows every row to the codes within twice its certified bound of the scan's best and
    scores those by the definition: on planted near ties (every row), with a row whose bound is infinite
    (every code a candidate) and duplicated codes, it gives reference.exact_indices' answer."""
    from vlfast.ops.codebook_lookup import certify, reference
    z, e, _ = planted_near_ties(300, 40, dtype)
    e[7] = e[3]  # a duplicate: the lower index must win
    z = torch.cat([z, e[3:4]])
    terms = certify.codebook_terms(e, metric)
    held = {}
    torch_impl._scan(z, e, terms["alpha"], terms["beta"], metric=metric, held=held)
    beta_in_dot = metric == "l2" and dtype != torch.bfloat16
    norm_z = torch.linalg.vector_norm(z, dim=1, dtype=torch.float64)
    eps = certify.score_error(norm_z, terms, z.shape[1], torch_impl.dot_error(z.shape[1] + beta_in_dot), metric,
                              1, beta_in_dot)
    eps[5] = float("inf")
    rows = torch.arange(z.shape[0])
    got = torch_impl._rescore(z, e, metric, rows, eps, terms, held)
    assert torch.equal(got, reference.exact_indices(z, e, metric, rows))
    if metric == "l2":
        assert got[-1] == 3


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("d", [64, 1000])
def test_scan_scores_are_within_the_dot_error_bound(metric, d, fp32_gemm):
    """Every float32 score of the scan's GEMM is within dot_error(terms) * sum_k |z_k c_k| of the float64
    product of the same float32 operands (the bound score_error builds on), for features of mixed scales
    and signs: it holds for the GEMM PyTorch runs here, in whatever order it sums. l2 sums beta as one
    more term: with BLAS as a feature at D = 64 and as addmm's added matrix at D = 1000; oneDNN adds it
    as the GEMM's bias."""
    g = torch.Generator().manual_seed(d)
    z = torch.randn(300, d, generator=g) * torch.logspace(-3, 3, d)[torch.randperm(d, generator=g)]
    e = torch.randn(200, d, generator=g) * torch.logspace(-3, 3, d)[torch.randperm(d, generator=g)]
    terms = certify.codebook_terms(e, metric)
    form = torch_impl._form(metric, torch.float32, d)
    assert form == ("scaled" if metric == "cosine" else "feature" if d == 64 and fp32_gemm == "blas" else "bias")
    codes = torch_impl._codes(e, terms["alpha"], terms["beta"], form)
    rows = torch.cat([z, torch.ones(z.shape[0], 1)], dim=1) if form == "feature" else z
    scores = torch_impl._scores(rows, codes, terms["alpha"], terms["beta"], form, torch.empty(300, 200))
    if form == "bias":  # the same D + 1 terms as the "feature" form's
        rows, codes = torch.cat([z, torch.ones(z.shape[0], 1)], dim=1), torch.cat([codes, terms["beta"][:, None]], 1)
    exact = rows.double() @ codes.double().T
    bound = torch_impl.dot_error(rows.shape[1]) * (rows.double().abs() @ codes.double().abs().T)
    assert ((scores.double() - exact).abs() <= bound).all()
    assert (scores.double() != exact).any()  # rounded in float32: there is an error to bound


def test_row_norm_bounds_bound_the_float64_norms():
    """certify.row_norm_bounds (float32 rows on a CPU) is at least each row's norm in float64, tightly for
    ordinary rows; rows of subnormal or tiny values whose squares flush, rows near float32's limits, and
    zero rows included; a row whose squares overflow float32 gets inf (never certified)."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(64, generator=g) * 10 ** float(p) for p in range(-30, 19, 4)]
    rows += [torch.full((64,), 1e-40), torch.full((64,), 3e-39), torch.zeros(64), torch.full((64,), 1e-20),
             torch.cat([torch.full((32,), 1e-25), torch.randn(32, generator=g) * 1e-18])]
    x = torch.stack(rows)
    exact = x.double().norm(dim=1)
    bound = certify.row_norm_bounds(x)
    assert (bound >= exact).all()
    ordinary = exact > 1e-15
    assert (bound[ordinary] <= exact[ordinary] * (1 + 1e-4)).all()
    assert certify.row_norm_bounds(torch.full((2, 64), 1e20)).isinf().all()


def _score_error_by_terms(norm_z, terms, d, c, metric, products, beta_in_dot):
    """certify.score_error's bound written term by term as its docstring derives it (float64)."""
    import math
    u, big_e, q = 2.0 ** -24, terms["max_norm"], (d + 3) * 2.0 ** -52
    if metric == "l2":
        relative = (2 * c + 4 * u) * norm_z * big_e + (4 * u + c * beta_in_dot) * big_e ** 2
        definition, scale = q * (norm_z + big_e) ** 2, 2.0
        peak = big_e ** 2 + 2 * norm_z * big_e * (1 + c)
    else:
        relative, definition, scale = (c + 4 * u) * norm_z, q * norm_z, terms["max_alpha"]
        peak = torch.maximum(torch.maximum(norm_z * big_e, norm_z), torch.maximum(scale, big_e))
    tiny = 2.0 ** -126 * scale * ((2 * products * d + 4) + products * math.sqrt(d) * (norm_z + big_e))
    eps = certify.SAFETY * (relative + definition + tiny)
    return torch.where(peak < certify.OVERFLOW, eps, float("inf"))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("products,beta_in_dot", [(1, False), (3, False), (1, True)])
@pytest.mark.parametrize("e_scale", [1e-30, 1e-3, 1.0, 1e3, 1e17, 1e30])
@pytest.mark.parametrize("host", [True, False], ids=["floats", "tensors"])
def test_score_error_is_the_derivations_bound(metric, products, beta_in_dot, e_scale, host, monkeypatch):
    """score_error's folded coefficients give the term-by-term bound (to float64 rounding), with inf for
    exactly the rows whose scores could overflow, and for NaN / inf norms; from host floats (CPU terms)
    and from 0-d tensors (as on a GPU, where reading them would sync)."""
    if metric == "cosine" and beta_in_dot:
        pytest.skip("beta_in_dot is the l2 scan's")
    if not host:
        monkeypatch.setattr(certify, "_on_host", lambda x: x)
    g = torch.Generator().manual_seed(11)
    e = (torch.randn(37, 24, generator=g, dtype=torch.float64) * e_scale).float()
    e[5] = 0.0
    if e_scale == 1e-30:
        e[7:] = 0.0
    terms = certify.codebook_terms(e, metric)
    norm_z = torch.cat([torch.tensor([0.0, 2.0 ** -140, float("inf"), float("nan"), 2.0 ** 126, 2.0 ** 125]),
                        10.0 ** (torch.rand(200, generator=g, dtype=torch.float64) * 80 - 40)])
    c = torch_impl.dot_error(25)
    got = certify.score_error(norm_z, terms, 24, c, metric, products, beta_in_dot)
    want = _score_error_by_terms(norm_z, terms, 24, c, metric, products, beta_in_dot)
    assert torch.equal(got.isinf(), want.isinf() | norm_z.isnan())
    finite = want.isfinite()
    if metric == "l2" and e_scale == 1e30:  # ||e||^2 alone is past OVERFLOW
        assert not finite.any()
        return
    assert finite.sum() > 100
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-14, atol=0)
