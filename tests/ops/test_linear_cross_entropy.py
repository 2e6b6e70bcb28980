"""vlfast.linear_cross_entropy against the float64 specification: values, every gradient, options,
edge cases, errors, the torch.library boundary."""
import math

import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast.ops.linear_cross_entropy import linear_cross_entropy_backward, linear_cross_entropy_forward

from .clip_loss_cases import assert_close64, assert_relative_rule
from .linear_cross_entropy_cases import IGNORE, Case, make_inputs, pytorch_same_dtype, reference64, run_vlfast

OPTIONS = [  # (reduction, label_smoothing, softcap, z_loss, bias)
    ("mean", 0.0, None, 0.0, False),
    ("none", 0.1, None, 0.0, True),
    ("sum", 0.0, 2.0, 1e-3, False),  # a low cap, so that it bites
    ("mean", 0.2, 30.0, 1e-4, True),
]


def _check(case, impl):
    hidden, weight, bias, targets, grad = make_inputs(case)
    ref = reference64(case, hidden, weight, bias, targets, grad)
    got = run_vlfast(case, impl, hidden, weight, bias, targets, grad)
    ctx = f"{impl} {case}"
    if case.dtype == torch.float64:
        assert_close64(got, ref, 1e-10, ctx)
    else:
        base = pytorch_same_dtype(case, hidden, weight, bias, targets, grad)
        assert_relative_rule(got, ref, base, 1e-5 if case.dtype == torch.float32 else 2e-3, ctx)


def _case(n, h, v, dtype, option, **kw):
    reduction, eps, cap, zl, bias = option
    return Case(n, h, v, dtype, reduction, eps, cap, zl, bias, **kw)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,h,v", [(1, 64, 1), (33, 100, 97), (1000, 64, 97), (4, 4096, 97)])
def test_reference_matches_float64(n, h, v, dtype, option):
    _check(_case(n, h, v, dtype, option), "reference")


@pytest.mark.parametrize("v", [32000, 50257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_large_vocabularies(v, dtype):
    _check(_case(33, 64, v, dtype, OPTIONS[1]), "reference")


@pytest.mark.triton
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,h,v", [(1, 64, 1), (33, 100, 97), (20, 64, 300)])
def test_triton_matches_float64(n, h, v, dtype, option, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    _check(_case(n, h, v, dtype, option), "triton")


@pytest.mark.triton
@pytest.mark.parametrize("reduction,dtype", [("mean", torch.bfloat16), ("none", torch.float16),
                                             ("mean", torch.float32)], ids=str)
def test_triton_many_chunks(reduction, dtype, monkeypatch):
    """32 row chunks, d_weight summed over them (scaled float16 for half weights, float32 else):
    summing them in bfloat16 instead failed this rule (5x PyTorch's error)."""
    from vlfast.ops.linear_cross_entropy import triton as tri
    monkeypatch.setenv("VLFAST_POISON", "1")
    monkeypatch.setattr(tri, "MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(tri, "CHUNK_BYTES", 8 * 4 * 300)  # 8-row chunks
    _check(Case(256, 64, 300, dtype, reduction, 0.1, 30.0, 1e-4, True, ignored=0.1), "triton")


@pytest.mark.triton
def test_triton_weight_gradient_beyond_float16_range(monkeypatch):
    """bf16 d_weight entries past float16's 65504 (summed over 8 chunks in scaled float16)."""
    from vlfast.ops.linear_cross_entropy import triton as tri
    monkeypatch.setenv("VLFAST_POISON", "1")
    monkeypatch.setattr(tri, "MIN_CHUNK_ROWS", 8)
    monkeypatch.setattr(tri, "CHUNK_BYTES", 8 * 4 * 50)
    case = Case(64, 32, 50, torch.bfloat16, "sum", z_loss=1e-3)
    hidden, weight, bias, targets, grad = make_inputs(case)
    hidden = hidden * 3000
    ref = reference64(case, hidden, weight, bias, targets, grad)
    assert ref["weight"].abs().max() > 65504
    got = run_vlfast(case, "triton", hidden, weight, bias, targets, grad)
    assert_relative_rule(got, ref, pytorch_same_dtype(case, hidden, weight, bias, targets, grad), 2e-3, "x3000")


@pytest.mark.triton
@pytest.mark.parametrize("reduction", ["mean", "none"])  # G made in the forward / in the backward
def test_triton_half_gradient_ignores_leftover_logits(reduction, monkeypatch):
    """A bfloat16 G lies over the first half of each float32 logits row; the second half keeps the
    old logits. Logits 1 + 2^-8 - 2^-16 have low halves 0x7F80, bfloat16 +inf: CPU BLAS's bfloat16
    GEMM read them past K (times zero) and gave NaN rows of d_hidden (before, 1 to 2 random rows in
    2 of 4 random inputs at this shape)."""
    monkeypatch.setenv("VLFAST_POISON", "1")
    case = Case(33, 100, 97, torch.bfloat16, reduction)
    hidden, weight, bias, targets, grad = make_inputs(case)
    leftover = slice((case.v + 1) // 2, None)  # the logits that the row's G does not cover
    hidden[:, -3:] = 1.0
    weight[leftover] = 0.0
    weight[leftover, -3:] = torch.tensor([1.0, 2.0 ** -8, -2.0 ** -16], dtype=weight.dtype)
    z = (hidden.float() @ weight.float().T)[:, leftover]
    assert (z.view(torch.int32) & 0xFFFF == 0x7F80).all()  # the inputs do what they are meant to
    ref = reference64(case, hidden, weight, bias, targets, grad)
    got = run_vlfast(case, "triton", hidden, weight, bias, targets, grad)
    assert_relative_rule(got, ref, pytorch_same_dtype(case, hidden, weight, bias, targets, grad), 2e-3, reduction)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
def test_large_vocabulary_with_ignored_rows(impl):
    _check(Case(17, 64, 32000 if impl == "reference" else 3000, torch.float32, "mean", 0.1, None, 0.0, True,
                ignored=0.5), impl)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored_follows_pytorch(impl, reduction):
    h = torch.randn(5, 16, requires_grad=True)
    w = torch.randn(11, 16, requires_grad=True)
    t = torch.full((5,), IGNORE)
    got = vlfast.linear_cross_entropy(h, w, t, reduction=reduction, impl=impl)
    want = F.cross_entropy(F.linear(h, w), t, reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)
    got.sum().backward()
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_empty_batch_is_handled_by_each_impl(impl, dtype):
    """N == 0 runs the requested impl's own code (no chunk, no kernel launch) and gives PyTorch's
    empty-batch values: F.cross_entropy's, computed in float32; gradients too (z_loss too: its bound
    on the logits must not reduce over no rows)."""
    for reduction, z_loss in (("mean", 0.0), ("sum", 0.0), ("none", 0.0), ("sum", 1e-3)):
        h, w = torch.randn(0, 8, dtype=dtype, requires_grad=True), torch.randn(5, 8, dtype=dtype, requires_grad=True)
        b = torch.randn(5, dtype=dtype, requires_grad=True)
        t = torch.zeros(0, dtype=torch.long)
        got = vlfast.linear_cross_entropy(h, w, t, bias=b, reduction=reduction, z_loss=z_loss, impl=impl)
        want = F.cross_entropy(F.linear(h, w, b).float(), t, reduction=reduction)
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True)
        if reduction != "mean":  # mean of nothing is NaN: its gradient is not defined
            got.sum().backward()
            assert h.grad.shape == (0, 8) and w.grad.dtype == dtype
            assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0


def test_matches_f_cross_entropy_exactly_in_float64():
    """The documented contract: F.cross_entropy(F.linear(...).float(), ...), here in float64."""
    h, w, b = torch.randn(40, 24, dtype=torch.float64), torch.randn(70, 24, dtype=torch.float64), \
        torch.randn(70, dtype=torch.float64)
    t = torch.randint(0, 70, (40,))
    t[::3] = 7  # a custom ignore_index
    for reduction in ("mean", "sum", "none"):
        got = vlfast.linear_cross_entropy(h, w, t, bias=b, ignore_index=7, reduction=reduction, label_smoothing=0.3)
        want = F.cross_entropy(F.linear(h, w, b), t, ignore_index=7, reduction=reduction, label_smoothing=0.3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_second_backward_through_the_graph_is_a_clear_error():
    h, w = torch.randn(6, 8, requires_grad=True), torch.randn(9, 8, requires_grad=True)
    loss = vlfast.linear_cross_entropy(h, w, torch.randint(0, 9, (6,)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward through the same graph"):
        loss.backward()


def test_int32_targets_and_frozen_weight():
    h = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(13, 16)  # a frozen head: only hidden gets a gradient
    t = torch.randint(0, 13, (9,), dtype=torch.int32)
    vlfast.linear_cross_entropy(h, w, t).backward()
    h2 = h.detach().clone().requires_grad_()
    F.cross_entropy(F.linear(h2, w), t.long()).backward()
    torch.testing.assert_close(h.grad, h2.grad)


# --- bad input -----------------------------------------------------------------------------------------

def _args(n=4, h=8, v=10):
    return torch.randn(n, h), torch.randn(v, h), torch.randint(0, v, (n,))


@pytest.mark.parametrize("change,exc,match", [
    (lambda a: (a[0], a[1], torch.tensor([0, 1, 10, 2])), ValueError, r"targets\[2\] = 10"),
    (lambda a: (a[0], a[1], torch.tensor([0, -5, 1, 2])), ValueError, r"targets\[1\] = -5"),
    (lambda a: (a[0], a[1], a[2].float()), TypeError, "class indices"),
    (lambda a: (a[0], a[1], a[2][:3]), ValueError, "3 entries but hidden has 4"),
    (lambda a: (a[0], a[1][:, :7], a[2]), ValueError, "differ in the hidden dimension"),
    (lambda a: (a[0], a[1].double(), a[2]), TypeError, "cast one"),
    (lambda a: (a[0][None], a[1], a[2]), ValueError, "hidden must be 2-D"),
    (lambda a: (a[0], a[1][:0], a[2].clamp(max=0)), ValueError, "V, H >= 1"),
    (lambda a: (a[0].long(), a[1].long(), a[2]), TypeError, "float16, bfloat16"),
    (lambda a: (a[0], a[1].to("meta"), a[2]), ValueError, "weight is on meta"),
])
def test_bad_input_gets_a_clear_error(change, exc, match):
    with pytest.raises(exc, match=match):
        vlfast.linear_cross_entropy(*change(_args()))


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"label_smoothing": 1.5}, ValueError, "label_smoothing must be in"),
    ({"logit_softcap": 0.0}, ValueError, "logit_softcap must be None or"),
    ({"logit_softcap": float("inf")}, ValueError, "logit_softcap"),
    ({"z_loss": -1.0}, ValueError, "z_loss must be"),
    ({"label_smoothing": True}, TypeError, "label_smoothing must be a number, got True"),
    ({"z_loss": True}, TypeError, "z_loss must be a number, got True"),
    ({"logit_softcap": True}, TypeError, "logit_softcap must be None or a number, got True"),
    ({"ignore_index": 1.0}, TypeError, "ignore_index must be an int"),
    ({"bias": torch.randn(9)}, ValueError, r"bias must be \(10,\)"),
    ({"impl": "cuda"}, vlfast.ImplUnavailableError, "no CUDA C\\+\\+ kernel"),
])
def test_bad_options_get_a_clear_error(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        vlfast.linear_cross_entropy(*_args(), **kwargs)


@pytest.mark.parametrize("option", ["label_smoothing", "z_loss", "logit_softcap"])
def test_module_refuses_boolean_options_when_built(option):
    with pytest.raises(TypeError, match=f"{option} must be"):
        vlfast.nn.LinearCrossEntropy(8, 10, **{option: True})
    with pytest.raises(TypeError, match=f"{option} must be"):
        vlfast.nn.LinearCrossEntropy.from_linear(torch.nn.Linear(8, 10), **{option: False})


# --- the torch.library boundary ----------------------------------------------------------------------

IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_opcheck(impl, reduction):
    h, w, t = torch.randn(6, 16, requires_grad=True), torch.randn(23, 16, requires_grad=True), torch.randint(0, 23, (6,))
    b = torch.randn(23, requires_grad=True)
    args = (h, w, t, b, IGNORE, 0.1, 10.0, 1e-3, reduction, impl, True, True, True)
    torch.library.opcheck(linear_cross_entropy_forward, args)
    _, lse, *_ = linear_cross_entropy_forward(*args)
    torch.library.opcheck(linear_cross_entropy_backward, (torch.rand(6), h.detach(), w.detach(), t, b.detach(),
                                                          lse.detach(), IGNORE, 0.1, 10.0, 1e-3, impl, True, False, True))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_forward_and_backward(impl, reduction):
    torch._dynamo.reset()

    def step(h, w, b, t):
        out = vlfast.linear_cross_entropy(h * 2, w, t, bias=b, reduction=reduction, label_smoothing=0.1,
                                          logit_softcap=20.0, impl=impl)
        return out.sum() if reduction == "none" else out

    h, w, b = (torch.randn(7, 16, requires_grad=True), torch.randn(19, 16, requires_grad=True),
               torch.randn(19, requires_grad=True))
    t = torch.randint(0, 19, (7,))
    out = torch.compile(step, fullgraph=True)(h, w, b, t)
    out.backward()
    grads = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    want = step(h, w, b, t)
    want.backward()
    torch.testing.assert_close(out, want)
    for g, x in zip(grads, (h, w, b)):
        torch.testing.assert_close(g, x.grad)
