"""vlfast.clip_loss against the float64 specification: values, every gradient, edge cases, errors.

The reference impl runs the whole grid; Triton kernels run in the interpreter on small shapes here
(tests/ops/test_clip_loss_gpu.py runs them on a GPU at full size).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast import ImplUnavailableError

from .clip_loss_cases import (NAMES, Case, assert_close64, assert_relative_rule, make_inputs, pytorch_same_dtype,
                              reference64, run_vlfast)

LOW = (torch.float16, torch.bfloat16)
LAYOUTS = [  # (kind, symmetric, offset, m - n)
    ("softmax", True, 0, 0),
    ("softmax", False, 5, 11),   # local rows against gathered columns, positives at an offset
    ("sigmoid", True, 0, 0),
    ("sigmoid", True, 3, 8),
    ("sigmoid", True, None, 6),  # a negative-only block (SigLIP's exchange)
]


def _case(n, d, dtype, layout, **kw):
    kind, symmetric, offset, extra = layout
    bias = -2.0 if kind == "sigmoid" else 0.5
    return Case(n=n, m=n + extra, d=d, dtype=dtype, kind=kind, symmetric=symmetric, offset=offset, bias=bias, **kw)


def _check(case, impl, rel_atol=None):
    a, b, s, bias, grad = make_inputs(case)
    ref = reference64(case, a, b, s, bias, grad)
    got = run_vlfast(case, impl, a, b, s, bias, grad)
    ctx = f"{impl} {case}"
    if case.dtype == torch.float64:
        assert_close64(got, ref, 1e-10, ctx, floor=1e-2)
    else:
        base = pytorch_same_dtype(case, a, b, s, bias, grad)
        atol = rel_atol if rel_atol is not None else (1e-5 if case.dtype == torch.float32 else 2e-3)
        assert_relative_rule(got, ref, base, atol, ctx)
    return got, ref


# --- the reference implementation: the full grid --------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 32), (7, 100), (97, 512), (1000, 768), (1031, 100)])
def test_reference_matches_float64(n, d, dtype, layout):
    _check(_case(n, d, dtype, layout), "reference")


# --- the Triton kernels, interpreted: small shapes, several tiles of 32 ------------------------------

@pytest.mark.triton
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 32), (7, 100), (97, 72)])
def test_triton_matches_float64(n, d, dtype, layout, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")  # scratch starts as NaN: unwritten elements would show
    _check(_case(n, d, dtype, layout), "triton")


@pytest.mark.triton
def test_triton_many_column_splits_and_row_chunks(monkeypatch):
    """Column splits in the forward and several row chunks in the backward."""
    from vlfast.ops.clip_loss import triton as tri
    monkeypatch.setenv("VLFAST_POISON", "1")
    monkeypatch.setattr(tri, "GRAD_CHUNK_BYTES", 128 * 600 * 4)  # one chunk of 128 rows
    monkeypatch.setattr(tri, "_MAX_BN", 32)  # narrow splits: 600 columns -> many
    for layout in (LAYOUTS[0], LAYOUTS[2]):
        _check(_case(300, 40, torch.float32, layout), "triton")


# --- the cases that broke other libraries ---------------------------------------------------------

def _margin_form_softmax64(a, b, s, grad):
    """Symmetric CLIP loss in float64 written as log1p(sum over negatives of exp(z - z_positive)):
    exact for losses near 1e-11, where logsumexp(z) - z_positive cancels even in float64."""
    a, b, s = (x.detach().double().requires_grad_() for x in (a, b, s))
    z = s * a @ b.T
    eye = torch.eye(len(z), dtype=torch.bool)
    rows = torch.logsumexp((z - z.diagonal()[:, None]).masked_fill(eye, float("-inf")), dim=1)
    cols = torch.logsumexp((z - z.diagonal()[None, :]).masked_fill(eye, float("-inf")), dim=0)
    loss = (torch.log1p(torch.exp(rows)) + torch.log1p(torch.exp(cols))) / 2
    (loss * grad).sum().backward()
    return {"loss": loss.detach(), "image": a.grad, "text": b.grad, "scale": s.grad}


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_near_perfect_pairs_keep_relative_accuracy(impl):
    """True loss ~1e-11 at scale 100 (as in the anchors): float32 PyTorch rounds the loss and the
    positive's gradient to 0; vlfast keeps them to a relative 1e-3."""
    n, d = 64, 48
    shared = F.normalize(torch.randn(1, d, dtype=torch.float64), dim=-1) * 1.5  # negatives at cosine ~0.7
    img = F.normalize(shared + F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1), dim=-1)
    case = Case(n=n, m=n, d=d, dtype=torch.float32, scale=100.0)
    a, b, s, bias, grad = make_inputs(case, img, img.clone())
    ref = _margin_form_softmax64(a, b, s, grad)
    assert 1e-13 < float(ref["loss"].min()) < 1e-9 and float(ref["loss"].max()) < 1e-5
    got = run_vlfast(case, impl, a, b, s, bias, grad)
    assert_close64(got, ref, 1e-3, f"{impl} near-perfect")
    torch_fp32 = pytorch_same_dtype(case, a, b, s, bias, grad)
    trap = ((torch_fp32["loss"] - ref["loss"]).abs() / ref["loss"]).max()  # PyTorch float32 loses rows entirely
    mine = ((got["loss"] - ref["loss"]).abs() / ref["loss"]).max()
    assert trap > 0.5 and mine < 1e-3, (float(trap), float(mine))


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_scale_100_on_random_features(impl, kind):
    case = Case(n=97, m=97, d=64, dtype=torch.float32, kind=kind, scale=100.0,
                bias=-10.0 if kind == "sigmoid" else None)
    _check(case, impl)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_scale_to_zero_gives_log_n(impl):
    n = 50
    case = Case(n=n, m=n, d=32, dtype=torch.float32, scale=1e-9)
    a, b, s, bias, grad = make_inputs(case)
    got = run_vlfast(case, impl, a, b, s, bias, grad)
    assert torch.allclose(got["loss"], torch.full((n,), math.log(n), dtype=torch.float64), rtol=1e-6)
    ref = reference64(case, a, b, s, bias, grad)
    assert_close64(got, ref, 1e-5, f"{impl} scale->0")


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_duplicate_rows_and_unnormalised_features(impl):
    n, d = 40, 33
    img = torch.randn(n, d, dtype=torch.float64) * 3
    img[5] = img[17] = img[30]  # duplicates: tied logits
    txt = torch.randn(n, d, dtype=torch.float64) * 3
    txt[2] = txt[3]
    for kind in ("softmax", "sigmoid"):
        case = Case(n=n, m=n, d=d, dtype=torch.float32, kind=kind, scale=2.0, normalize=False)
        a, b, s, bias, grad = make_inputs(case, img, txt)
        ref = reference64(case, a, b, s, bias, grad)
        got = run_vlfast(case, impl, a, b, s, bias, grad)
        base = pytorch_same_dtype(case, a, b, s, bias, grad)
        assert_relative_rule(got, ref, base, 1e-5, f"{impl} {kind} duplicates")


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature_gradient_as_accurate_as_pytorch(impl, dtype):
    """The gradient of the scale (cut-cross-entropy's is off by 35%) within the relative rule alone."""
    case = Case(n=97, m=97, d=100, dtype=dtype, scale=30.0)
    a, b, s, bias, grad = make_inputs(case)
    ref, got, base = (f(case, *((impl,) if f is run_vlfast else ()), a, b, s, bias, grad)
                      for f in (reference64, run_vlfast, pytorch_same_dtype))
    e, e_base = abs(float(got["scale"] - ref["scale"])), abs(float(base["scale"] - ref["scale"]))
    assert e <= 2 * e_base + 1e-6 * abs(float(ref["scale"])), (e, e_base)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_reductions(kind, reduction):
    case = Case(n=13, m=13, d=16, dtype=torch.float64, kind=kind, bias=-1.0 if kind == "sigmoid" else None)
    a, b, s, bias, grad = make_inputs(case)
    per_row = vlfast.clip_loss(a, b, s, bias, kind=kind, reduction="none")
    value = vlfast.clip_loss(a, b, s, bias, kind=kind, reduction=reduction)
    expect = per_row.mean() if reduction == "mean" else per_row.sum()
    assert torch.allclose(value, expect, rtol=1e-12)
    # "mean" is open_clip's convention for both kinds: softmax averages the directions; sigmoid sums / N
    logits = s.double() * a @ b.T + (bias if bias is not None else 0)
    if kind == "softmax" and reduction == "mean":
        labels = torch.arange(13)
        want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        assert torch.allclose(value, want, rtol=1e-12)
    if kind == "sigmoid" and reduction == "mean":
        want = -F.logsigmoid((2 * torch.eye(13, dtype=torch.float64) - 1) * logits).sum() / 13
        assert torch.allclose(value, want, rtol=1e-12)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_frozen_tower_and_python_scalars(impl):
    """Only the text tower trains (LiT); scale and bias as plain floats get no gradient."""
    a = F.normalize(torch.randn(9, 16), dim=-1)
    b = F.normalize(torch.randn(9, 16), dim=-1).requires_grad_()
    loss = vlfast.clip_loss(a, b, 10.0, -3.0, kind="sigmoid", impl=impl)
    loss.backward()
    b64 = b.detach().double().requires_grad_()
    want = -F.logsigmoid((2 * torch.eye(9, dtype=torch.float64) - 1) * (10 * a.double() @ b64.T - 3)).sum() / 9
    want.backward()
    assert torch.allclose(loss.double(), want, rtol=1e-5)
    assert torch.allclose(b.grad.double(), b64.grad, rtol=1e-4, atol=1e-6)


def test_result_dtype_and_device():
    a = torch.randn(5, 8, dtype=torch.bfloat16)
    assert vlfast.clip_loss(a, a, 1.0).dtype == torch.float32
    assert vlfast.clip_loss(a.double(), a.double(), 1.0).dtype == torch.float64
    assert vlfast.clip_loss(a, a, 1.0, reduction="none").shape == (5,)


def test_python_scalars_keep_float64_precision():
    a = torch.nn.functional.normalize(torch.randn(5, 24, dtype=torch.float64), dim=-1)
    as_float = vlfast.clip_loss(a, a.flip(0), 1 / 0.07, 0.25)
    as_tensor = vlfast.clip_loss(a, a.flip(0), torch.tensor(1 / 0.07, dtype=torch.float64),
                                 torch.tensor(0.25, dtype=torch.float64))
    assert torch.allclose(as_float, as_tensor, rtol=1e-14)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_non_contiguous_inputs(impl):
    """Strided rows and column-major features go through impl as views (not copied by the test), against the
    float64 dense reference, losses and every gradient."""
    base = torch.randn(20, 32, requires_grad=True)
    at = torch.randn(16, 10, requires_grad=True)
    for x, y in ((base[::2], base[1::2, :]), (at.T, at.T.flip(0)[:, 3:])):  # strided rows; column-major (10, 13)
        x, y = (x, y) if y.shape == x.shape else (x[:, 3:], y)
        assert not (x.is_contiguous() or y.is_contiguous())
        case = Case(n=x.shape[0], m=y.shape[0], d=x.shape[1], dtype=torch.float32)
        scale = torch.tensor(3.0, requires_grad=True)
        grad = torch.randn(x.shape[0], dtype=torch.float64)
        loss = vlfast.clip_loss(x, y, scale, impl=impl, reduction="none")  # the views themselves
        d_x, d_y, d_s = torch.autograd.grad((loss.double() * grad).sum(), (x, y, scale))
        got = {"loss": loss.detach().double(), NAMES[1]: d_x.double(), NAMES[2]: d_y.double(), NAMES[3]: d_s.double()}
        ref = reference64(case, x.detach(), y.detach(), scale.detach(), None, grad)
        assert_close64(got, ref, 1e-5, f"{impl} strided")


# --- dispatch ---------------------------------------------------------------------------------------

def test_auto_on_cpu_is_torch(monkeypatch):
    from vlfast.ops import clip_loss as op
    seen = []
    real = op._FORWARD["torch"]
    monkeypatch.setitem(op._FORWARD, "torch", lambda *a: seen.append(1) or real(*a))
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    vlfast.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0)
    assert seen


def test_env_impl_is_an_explicit_choice(monkeypatch):
    monkeypatch.setenv("VLFAST_IMPL", "cuda")
    with pytest.raises(ImplUnavailableError, match="impl='cuda'"):
        vlfast.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0)
    monkeypatch.setenv("VLFAST_IMPL", "fastest")
    with pytest.raises(ValueError, match="VLFAST_IMPL"):
        vlfast.clip_loss(torch.randn(3, 4), torch.randn(3, 4), 1.0)


def test_explicit_impl_never_falls_back(monkeypatch):
    x = torch.randn(3, 4)
    with pytest.raises(ImplUnavailableError, match="vlfast._C"):
        vlfast.clip_loss(x, x, 1.0, impl="cuda")
    with pytest.raises(ImplUnavailableError, match="float64"):
        vlfast.clip_loss(x.double(), x.double(), 1.0, impl="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="CUDA tensors"):
        vlfast.clip_loss(x, x, 1.0, impl="triton")
    with pytest.raises(ValueError, match="impl must be one of"):
        vlfast.clip_loss(x, x, 1.0, impl="fast")


def test_implementation_status_reports_reasons():
    from vlfast.ops.clip_loss import implementation_status
    status = implementation_status("cpu", torch.float32)
    assert status["reference"] is None
    assert "vlfast._C" in status["cuda"]


# --- bad input ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.randn(4, 8), torch.randn(4, 9), 1.0), {}, ValueError, "feature dimensions differ"),
    ((torch.randn(4, 8, 1), torch.randn(4, 8), 1.0), {}, ValueError, "image_features must be 2-D"),
    ((torch.randn(4, 8), torch.randn(8), 1.0), {}, ValueError, "text_features must be 2-D"),
    ((torch.randn(0, 8), torch.randn(0, 8), 1.0), {}, ValueError, "empty"),
    ((torch.randn(4, 0), torch.randn(4, 0), 1.0), {}, ValueError, "dimension 0"),
    ((torch.randn(4, 8), torch.randn(4, 8).double(), 1.0), {}, TypeError, "cast one"),
    ((torch.randint(0, 3, (4, 8)), torch.randint(0, 3, (4, 8)), 1.0), {}, TypeError, "float16, bfloat16"),
    ((torch.randn(4, 8), torch.randn(4, 8, device="meta"), 1.0), {}, ValueError, "is on meta"),
    ((torch.randn(4, 8), torch.randn(4, 8), float("inf")), {}, ValueError, "logit_scale must be finite"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.tensor(float("nan"))), {}, ValueError, "logit_scale must be finite"),
    ((torch.randn(4, 8), torch.randn(4, 8), 1.0, torch.tensor(float("-inf"))), {"kind": "sigmoid"}, ValueError,
     "logit_bias must be finite"),
    ((torch.randn(4, 8), torch.randn(4, 8), -1.0), {}, ValueError, "logit_scale must be >= 0"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.tensor(-0.5)), {}, ValueError, "logit_scale must be >= 0"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.tensor(-2.0)), {"kind": "sigmoid"}, ValueError,
     "logit_scale must be >= 0"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.ones(2)), {}, ValueError, "logit_scale must hold one value"),
    ((torch.randn(4, 8), torch.randn(4, 8), torch.tensor(3)), {}, TypeError, "floating-point"),
    ((torch.randn(4, 8), torch.randn(4, 8), "1"), {}, TypeError, "tensor or a real number"),
    ((torch.randn(4, 8), torch.randn(4, 8), 1.0), {"kind": "infonce"}, ValueError, "kind must be one of"),
    ((torch.randn(4, 8), torch.randn(4, 8), 1.0), {"reduction": "avg"}, ValueError, "reduction must be one of"),
    ((torch.randn(4, 8), torch.randn(6, 8), 1.0), {"positive_offset": 3}, ValueError, "positive_offset <= 2"),
    ((torch.randn(4, 8), torch.randn(6, 8), 1.0), {"positive_offset": -1}, ValueError, "0 <= positive_offset"),
    ((torch.randn(4, 8), torch.randn(6, 8), 1.0), {}, ValueError, "symmetric=True needs a square block"),
    ((torch.randn(4, 8), torch.randn(4, 8), 1.0), {"positive_offset": None}, ValueError, "needs positives"),
    ((torch.randn(4, 8), torch.randn(4, 8), 1.0), {"kind": "sigmoid", "symmetric": False}, ValueError,
     "no direction"),
    ((torch.randn(4, 8), torch.randn(4, 8), 1.0), {"positive_offset": 1.0}, TypeError, "int or None"),
])
def test_bad_input_gets_a_clear_error(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vlfast.clip_loss(*args, **kwargs)


def test_single_pair_works():
    a, b = torch.randn(1, 8, requires_grad=True), torch.randn(1, 8, requires_grad=True)
    loss = vlfast.clip_loss(a, b, 5.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(a.grad) == 0  # one pair: softmax over one logit
