"""vlfast.codebook_lookup against the float64 definition: exact indices, distances, edge cases, errors.

The reference impl runs the full grid; the Triton kernels run in the interpreter on small shapes
(tests/ops/test_codebook_lookup_gpu.py runs them on a GPU at full size).
"""
import pytest
import torch

import vlfast
from vlfast import ImplUnavailableError
from vlfast.ops.codebook_lookup import certify
from vlfast.ops.codebook_lookup import reference as spec

from .codebook_lookup_cases import GAPS, assert_exact, planted_near_ties, random_case, realised_gaps

LOW = (torch.float32, torch.bfloat16, torch.float16)
TRITON = pytest.param("triton", marks=pytest.mark.triton)
IMPLS = ["reference", TRITON]


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")  # scratch starts as NaN: unwritten elements would show


def _triton_module():
    from vlfast.ops.codebook_lookup import triton
    return triton


def _run(z, e, metric, impl, context=""):
    index, dist = vlfast.codebook_lookup(z, e, metric=metric, impl=impl)
    assert_exact(z, e, metric, index, dist, f"{impl} {metric} {tuple(z.shape)} x {tuple(e.shape)} {z.dtype} {context}")
    return index, dist


# --- random data, odd shapes --------------------------------------------------------------------------

REFERENCE_SHAPES = [(0, 5, 8), (1, 1, 3), (1, 8193, 256), (127, 1000, 48), (127, 8193, 8), (33, 1000, 100),
                    (65537, 1, 3), (65537, 7, 8), (5, 1000, 256)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
@pytest.mark.parametrize("n,k,d", REFERENCE_SHAPES, ids=lambda s: str(s))
def test_reference_is_the_float64_argmin(n, k, d, dtype, metric):
    if n * k * d > 4e7 and dtype != torch.float32:
        pytest.skip("the largest shapes run once, in float32 (the oracle is O(N K D) elementwise)")
    _run(*random_case(n, k, d, dtype), metric, "reference")


TRITON_SHAPES = [(1, 1, 3), (127, 1000, 48), (37, 300, 100), (64, 70, 8), (5, 33, 256), (3, 8193, 8)]


@pytest.mark.triton
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("n,k,d", TRITON_SHAPES, ids=lambda s: str(s))
def test_triton_is_the_float64_argmin(n, k, d, dtype, metric):
    _run(*random_case(n, k, d, dtype), metric, "triton")
    # Random data seldom needs float64; many re-scored rows would mean scan results went missing
    # (its scratch starts as NaN, which the certification rejects).
    assert _triton_module().last_call["rescored"] <= max(2, n // 20)


@pytest.mark.triton
def test_triton_many_rows():  # N = 65537 runs on the reference path: the interpreter takes ~15 s for it
    _run(*random_case(4099, 3, 3, torch.float32), "l2", "triton")
    _run(*random_case(2049, 40, 8, torch.bfloat16), "cosine", "triton")


# --- near-ties, ties, cancellation ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_planted_near_ties(impl, dtype):
    z, e, planted = planted_near_ties(400, 48, dtype)
    got = realised_gaps(z, e)
    if dtype == torch.float32:  # the planted gaps survive rounding to float32
        for gap in GAPS:
            assert torch.allclose(got[planted == gap].median(), torch.tensor(gap, dtype=torch.float64), rtol=0.5)
    _run(z, e, "l2", impl, "near-ties")
    if impl == "triton":
        assert _triton_module().last_call["rescored"] > 0


@pytest.mark.triton
def test_near_ties_need_the_error_bound(monkeypatch):
    """The check above can fail: with the error bound set to zero the scan's fp32 rounding picks the
    wrong code on some near-tie rows."""
    z, e, _ = planted_near_ties(400, 48, torch.float32, rows_per_gap=16)
    monkeypatch.setattr(certify, "score_error", lambda norm_z, *args: torch.zeros_like(norm_z))
    index, _ = vlfast.codebook_lookup(z, e, impl="triton")
    want, _ = spec.spec_lookup(z, e, "l2")
    assert (index != want).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_duplicate_codes_give_the_lowest_index(impl, metric, dtype):
    z, e = random_case(50, 300, 16, dtype)
    e[[7, 40, 299]] = e[123].clone()  # duplicates in different code tiles and splits
    if metric == "cosine":
        e[200] = 2 * e[123]  # the same direction: an exact tie of the cosine
    z[:25] = (e[123].double() + 0.01 * torch.randn(25, 16, dtype=torch.float64)).to(dtype)
    index, _ = _run(z, e, metric, impl, "duplicates")
    assert (index[:25] == 7).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_all_equal_codebook_gives_index_zero(impl, metric):
    z, _ = random_case(40, 1, 24, torch.float32)
    e = torch.randn(1, 24).expand(37, 24)  # also a stride-0 codebook
    index, _ = _run(z, e, metric, impl, "all equal")
    assert (index == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_large_common_offset(impl, dtype):
    """z and codes near 300 in every coordinate: ||e||^2 - 2 z.e cancels; the exact pick survives."""
    z, e = random_case(60, 200, 32, dtype, offset=300.0)
    _run(z, e, "l2", impl, "offset")
    if impl == "triton" and dtype == torch.float32:
        assert _triton_module().last_call["rescored"] > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_huge_and_tiny_magnitudes(impl):
    """fp32 scores would overflow (1e20) or lose digits to subnormals (1e-41): still exact."""
    for scale in (1e20, 1e-41):
        z, e = random_case(40, 50, 8, torch.float64)
        _run((z * scale).float(), (e * scale).float(), "l2", impl, f"scale {scale}")
        if impl == "triton" and scale > 1:
            assert _triton_module().last_call["rescored"] == 40


# --- cosine -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_cosine_zero_vectors(impl):
    z, e = random_case(6, 20, 12, torch.float32)
    z[2] = 0
    e[5] = 0
    index, dist = _run(z, e, "cosine", impl, "zeros")
    assert index[2] == 0 and dist[2] == 1.0
    assert (index != 5).all()


def test_cosine_distance_is_one_minus_cosine():
    z, e = random_case(30, 40, 10, torch.float64)
    index, dist = vlfast.codebook_lookup(z, e, metric="cosine")
    cos = torch.nn.functional.cosine_similarity(z[:, None], e[None], dim=-1)
    assert torch.equal(index, cos.argmax(dim=1))
    torch.testing.assert_close(dist.double(), 1 - cos.max(dim=1).values, rtol=1e-6, atol=1e-7)


# --- layouts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dims_channels_first_and_strides(impl):
    images = torch.randn(2, 12, 5, 3)  # (B, D, H, W)
    z = images.permute(0, 2, 3, 1)  # (B, H, W, D): a non-contiguous view
    e = torch.randn(40, 24)[:, ::2]  # strided features
    index, dist = _run(z, e, "l2", impl, "views")
    assert index.shape == (2, 5, 3)
    want = vlfast.codebook_lookup(z.contiguous(), e.contiguous(), impl=impl)
    assert torch.equal(index, want[0]) and torch.equal(dist, want[1])


def test_empty_batch_and_no_gradient():
    e = torch.randn(5, 8, requires_grad=True)
    index, dist = vlfast.codebook_lookup(torch.randn(0, 3, 8), e)
    assert index.shape == dist.shape == (0, 3) and index.dtype == torch.int64 and dist.dtype == torch.float32
    z = torch.randn(4, 8, requires_grad=True)
    _, dist = vlfast.codebook_lookup(z, e)
    assert not dist.requires_grad


@pytest.mark.triton
def test_triton_splits_merge_with_ties(monkeypatch):
    """Many codebook splits; tied codes in different splits keep the lowest index."""
    tri = _triton_module()
    monkeypatch.setattr(tri, "MAX_BN", 32)
    z, e = random_case(20, 500, 16, torch.float32)
    e[[90, 300, 480]] = e[400].clone()
    z[:5] = e[400]
    index, _ = _run(z, e, "l2", "triton", "splits")
    assert (index[:5] == 90).all()


def test_merge_splits_keeps_the_true_second():  # splits.merge serves the Triton and CUDA scans
    from vlfast.ops.codebook_lookup import splits
    inf = float("inf")
    best = torch.tensor([[1.0, 5.0, 2.0], [1.0, 0.0, 2.0]])  # (splits=2, N=3)
    second = torch.tensor([[3.0, 6.0, 9.0], [1.5, 4.0, 2.0]])
    index = torch.tensor([[0, 1, 2], [10, 11, 12]], dtype=torch.int32)
    b, s, i = splits.merge(best, second, index)
    assert b.tolist() == [1.0, 0.0, 2.0] and i.tolist() == [0, 11, 2]
    assert s.tolist() == [1.0, 4.0, 2.0]  # a tie across splits makes the second equal the best
    assert inf not in s.tolist()
    assert [t.tolist() for t in splits.merge(best[:1], second[:1], index[:1])] == [[1.0, 5.0, 2.0], [3.0, 6.0, 9.0],
                                                                                [0, 1, 2]]


def test_split_plan_tiles_the_codebook():
    from vlfast.ops.codebook_lookup import splits
    cpu = torch.device("cpu")  # 4 "SMs": the grid aims at 16 programs
    assert splits.plan(1, 300, cpu, 128) == (3, 128)
    assert splits.plan(1, 5000, cpu, 128) == (14, 384)  # multiples of the code tile, none empty
    assert splits.plan(64, 5000, cpu, 128) == (1, 5120)
    assert splits.plan(1, 1, cpu, 32) == (1, 32)


# --- dispatch -----------------------------------------------------------------------------------------

def test_auto_on_cpu_is_torch(monkeypatch):
    from vlfast.ops import codebook_lookup as op
    seen = []
    real = op._FORWARD["torch"]
    monkeypatch.setitem(op._FORWARD, "torch", lambda *a: seen.append(1) or real(*a))
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    vlfast.codebook_lookup(torch.randn(3, 4), torch.randn(5, 4))
    assert seen


def test_explicit_impl_never_falls_back(monkeypatch):
    z, e = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ImplUnavailableError, match="vlfast._C"):
        vlfast.codebook_lookup(z, e, impl="cuda")
    with pytest.raises(ImplUnavailableError, match="float64"):
        vlfast.codebook_lookup(z.double(), e.double(), impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="CUDA tensors"):
        vlfast.codebook_lookup(z, e, impl="triton")
    monkeypatch.setenv("VLFAST_IMPL", "cuda")
    with pytest.raises(ImplUnavailableError, match="impl='cuda'"):
        vlfast.codebook_lookup(z, e)


def test_implementation_status_reports_reasons():
    from vlfast.ops.codebook_lookup import implementation_status
    status = implementation_status("cpu", torch.float32)
    assert status["reference"] is None and "vlfast._C" in status["cuda"]


# --- bad input ----------------------------------------------------------------------------------------

def _with(x, row, value):
    x = x.clone()
    x[row, 1] = value
    return x


Z, E = torch.randn(6, 8), torch.randn(10, 8)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((Z, torch.randn(10, 9)), {}, ValueError, "feature dimensions differ"),
    ((Z, torch.randn(0, 8)), {}, ValueError, "K = 0"),
    ((torch.randn(6, 0), torch.randn(10, 0)), {}, ValueError, "D = 0"),
    ((Z, torch.randn(10, 8, 1)), {}, ValueError, "codebook must be 2-D"),
    ((torch.tensor(1.0), E), {}, ValueError, "z must have a feature dimension"),
    ((Z.long(), E), {}, TypeError, "z must be float16, bfloat16"),
    ((Z, E.int()), {}, TypeError, "codebook must be float16, bfloat16"),
    ((Z, E.double()), {}, TypeError, "cast one"),
    ((Z, E.to("meta")), {}, ValueError, "is on meta"),
    ((Z.numpy(), E), {}, TypeError, "z must be a tensor"),
    ((Z, E), {"metric": "dot"}, ValueError, "metric must be one of"),
    ((Z, E), {"impl": "fast"}, ValueError, "impl must be one of"),
])
def test_bad_input_gets_a_clear_error(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vlfast.codebook_lookup(*args, **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("z,e,match", [
    (_with(Z, 3, float("nan")), E, "z must be finite; row 3"),
    (_with(Z, 4, float("inf")), E, "z must be finite; row 4"),
    (_with(Z, 0, -float("inf")), E, "z must be finite; row 0"),
    (Z, _with(E, 7, float("nan")), "codebook must be finite; row 7"),
    (Z, _with(E, 2, float("inf")), "codebook must be finite; row 2"),
], ids=["z-nan", "z-inf", "z-neg-inf", "codebook-nan", "codebook-inf"])
def test_non_finite_values_get_a_clear_error(impl, metric, z, e, match):
    for dtype in (torch.float32, torch.bfloat16):
        with pytest.raises(ValueError, match=match):
            vlfast.codebook_lookup(z.to(dtype), e.to(dtype), metric=metric, impl=impl)


def test_nvtx_range(tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_nvtx import FAKE_NVTX
    (tmp_path / "nvtx.py").write_text(FAKE_NVTX)
    script = "import torch, nvtx, vlfast; vlfast.codebook_lookup(torch.randn(5, 8), torch.randn(3, 8)); print(nvtx.calls)"
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "VLFAST_NVTX": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str([("vlfast", "vlfast.codebook_lookup.fwd")])


def test_bench_tiny_reports_index_mismatch(tmp_path):
    """The bench script runs, and its op-specific compare reports the fraction of wrong indices."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "vlfast", "bench", "codebook_lookup", "--tiny", "--device", "cpu",
                          "--json", str(tmp_path / "rows.json")], cwd=Path(__file__).resolve().parents[2],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {(r["case"], r["impl"]): r for r in json.loads((tmp_path / "rows.json").read_text())}
    lookup, step = rows["256x64x16-fp32", "vlfast-torch"], rows["vq-step-256x64x16-fp32", "vlfast-torch"]  # CPU path
    assert lookup["status"] == step["status"] == "ok"
    assert lookup["errors"]["index_mismatch"] == 0 and lookup["errors"]["distances"] < 1e-6
    assert step["errors"]["index_mismatch"] == 0 and step["errors"]["d_z"] < 1e-6
    assert rows["256x64x16-fp32", "torch-cdist"]["status"] == "ok"
