"""impl="torch" (vlfast/ops/clip_loss/torch_impl.py, the CPU fast path) against the float64 spec:
outputs and every gradient, all layouts, odd shapes, several row chunks, near-perfect pairs at scale 100."""
import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast.ops.clip_loss import torch_impl

from .clip_loss_cases import Case, assert_close64, make_inputs, pytorch_same_dtype, reference64, run_vlfast
from .test_clip_loss import LAYOUTS, _case, _check, _margin_form_softmax64

# every test with either library under the float32 GEMMs (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("fp32_gemm")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 32), (7, 100), (97, 72), (1025, 64)])
def test_torch_matches_float64(n, d, dtype, layout):
    _check(_case(n, d, dtype, layout), "torch")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_small_chunks_give_the_same_result(layout, dtype, monkeypatch):
    """Rows split into chunks of 3 (uneven last chunk): same values as one chunk, and still the spec."""
    case = _case(97, 40, dtype, layout)
    a, b, s, bias, grad = make_inputs(case)
    whole = run_vlfast(case, "torch", a, b, s, bias, grad)
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 3 * case.m)
    chunked = run_vlfast(case, "torch", a, b, s, bias, grad)
    ref = reference64(case, a, b, s, bias, grad)
    for name, x in whole.items():
        if x is not None:
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(chunked[name], x, rtol=tol, atol=tol * float(x.abs().max()),
                                       msg=lambda m: f"{name}: {m}")
    if dtype == torch.float64:
        assert_close64(chunked, ref, 1e-10, "chunked", floor=1e-2)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("chunked", [False, True], ids=["one-chunk", "chunks-of-3"])
def test_bf16_output_gradient_gemms_match_float64(layout, chunked, monkeypatch):
    """bf16 features past BF16_OUT_MIN_LOGITS (forced here at 97 x 97): d_a and d_b from bf16-output GEMMs
    of the rounded s G, d_scale from d_a, within bf16 PyTorch's error twice over, in one chunk or several."""
    monkeypatch.setattr(torch_impl, "BF16_OUT_MIN_LOGITS", 0)
    case = _case(97, 72, torch.bfloat16, layout)
    if chunked:
        monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 3 * case.m)
    _check(case, "torch")


def test_near_perfect_pairs_keep_relative_accuracy():
    """True loss ~1e-11 at scale 100: dense float32 PyTorch is off by O(1) relative, impl="torch" is not."""
    n, d = 64, 48
    shared = F.normalize(torch.randn(1, d, dtype=torch.float64), dim=-1) * 1.5
    img = F.normalize(shared + F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1), dim=-1)
    case = Case(n=n, m=n, d=d, dtype=torch.float32, scale=100.0)
    a, b, s, bias, grad = make_inputs(case, img, img.clone())
    ref = _margin_form_softmax64(a, b, s, grad)
    assert 1e-13 < float(ref["loss"].min()) < 1e-9 and float(ref["loss"].max()) < 1e-5
    got = run_vlfast(case, "torch", a, b, s, bias, grad)
    assert_close64(got, ref, 1e-3, "torch near-perfect")
    dense = pytorch_same_dtype(case, a, b, s, bias, grad)
    trap = ((dense["loss"] - ref["loss"]).abs() / ref["loss"]).max()
    mine = ((got["loss"] - ref["loss"]).abs() / ref["loss"]).max()
    assert trap > 0.5 and mine < 1e-4, (float(trap), float(mine))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_scale_100_on_random_features(kind):
    case = Case(n=97, m=97, d=64, dtype=torch.float32, kind=kind, scale=100.0,
                bias=-10.0 if kind == "sigmoid" else None)
    _check(case, "torch")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(kind, reduction):
    case = _case(33, 24, torch.float64, LAYOUTS[0] if kind == "softmax" else LAYOUTS[2])
    a, b, s, bias, grad = make_inputs(case)
    got = run_vlfast(case, "torch", a, b, s, bias, grad, reduction=reduction)
    ref = run_vlfast(case, "reference", a, b, s, bias, grad, reduction=reduction)
    assert_close64(got, ref, 1e-12, f"{kind} {reduction}", floor=1e-2)


def test_frozen_tower():
    """Only the text tower trains: d_image is not computed, the rest matches the reference."""
    a, b = torch.randn(40, 16), torch.randn(40, 16, requires_grad=True)
    s = torch.tensor(10.0, requires_grad=True)
    vlfast.clip_loss(a, b, s, impl="torch").backward()
    b2, s2 = b.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    vlfast.clip_loss(a, b2, s2, impl="reference").backward()
    torch.testing.assert_close(b.grad, b2.grad)
    torch.testing.assert_close(s.grad, s2.grad)


def test_auto_on_cpu_picks_torch(monkeypatch):
    called = []
    monkeypatch.setitem(vlfast.ops.clip_loss._FORWARD, "torch",
                        lambda *args: called.append(1) or torch_impl.forward(*args))
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    vlfast.clip_loss(torch.randn(5, 8), torch.randn(5, 8), 3.0)
    assert called


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bfloat16_logits_keep_float32_accuracy(kind):
    """bf16 features: the logits' GEMM accumulates in float32 into float32 (never bf16 logits), so the
    loss of the bf16 values is float32-accurate, far inside bf16 logits' error."""
    case = Case(n=300, m=300, d=256, dtype=torch.bfloat16, kind=kind, scale=30.0,
                bias=-5.0 if kind == "sigmoid" else None)
    a, b, s, bias, grad = make_inputs(case)
    ref = reference64(case, a, b, s, bias, grad)  # float64 of the same bf16 values
    got = run_vlfast(case, "torch", a, b, s, bias, grad)
    assert_close64({"loss": got["loss"]}, {"loss": ref["loss"]}, 2e-6, f"bf16 {kind}")
    base = pytorch_same_dtype(case, a, b, s, bias, grad)
    assert float((base["loss"] - ref["loss"]).abs().max()) > 20 * float((got["loss"] - ref["loss"]).abs().max())


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_scale_gradient_accurate_over_many_logits(kind):
    """d_scale sums N x N terms: summed naively in float32 (torch.dot) it was off by ~1e-5 relative."""
    case = Case(n=2048, m=2048, d=32, dtype=torch.float32, kind=kind, scale=100.0,
                bias=-10.0 if kind == "sigmoid" else None)
    a, b, s, bias, grad = make_inputs(case)
    got = run_vlfast(case, "torch", a, b, s, bias, grad)
    with torch.no_grad():
        ref = vlfast.clip_loss(a.double(), b.double(), s.double(), None if bias is None else bias.double(),
                               kind=kind, reduction="none", impl="reference")
    a64, b64, s64 = (x.double().requires_grad_() for x in (a, b, s))
    loss = vlfast.clip_loss(a64, b64, s64, None if bias is None else bias.double(), kind=kind,
                            reduction="none", impl="reference")
    (loss * grad).sum().backward()
    assert torch.allclose(got["loss"], ref, rtol=1e-5)
    assert abs(float(got["scale"]) - float(s64.grad)) <= 3e-6 * abs(float(s64.grad))


def _gemms_in_backward(loss, d: int) -> int:
    """GEMM calls (aten::mm / addmm, or oneDNN's float32 inner product, as the profiler records them)
    with a (., d) or (d, .) operand while loss.backward() runs: the logits GEMM and the gradient ones,
    not small helper products."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        loss.backward()
    names = ("aten::mm", "aten::addmm", "aten::addmm_", "mkldnn::_linear_pointwise")
    return sum(1 for e in prof.events() if e.name in names
               and any(d in shape for shape in e.input_shapes if len(shape) == 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_one_chunk_backward_reuses_the_forward_products(kind, dtype, monkeypatch):
    """One chunk: the backward takes a @ b^T (or E) from the forward (two GEMMs: d_a, d_b), not a third
    one. Several chunks recompute each chunk's products (three GEMMs a chunk)."""
    a, b = (F.normalize(torch.randn(50, 16), dim=-1).to(dtype).requires_grad_() for _ in range(2))
    assert _gemms_in_backward(vlfast.clip_loss(a, b, 5.0, -1.0 if kind == "sigmoid" else None, kind=kind,
                                               impl="torch"), 16) == 2
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 20 * 50)  # 3 chunks of 20, 20, 10 rows
    assert _gemms_in_backward(vlfast.clip_loss(a, b, 5.0, -1.0 if kind == "sigmoid" else None, kind=kind,
                                               impl="torch"), 16) == 9


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_kept_products_survive_a_second_backward(kind):
    """retain_graph: the second backward reads the same kept products (nothing wrote into them)."""
    case = _case(33, 24, torch.float32, LAYOUTS[0] if kind == "softmax" else LAYOUTS[3])
    a, b, s, bias, grad = make_inputs(case)
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (a, b, s, bias)]
    loss = vlfast.clip_loss(*leaves, kind=kind, reduction="none", positive_offset=case.offset, impl="torch")
    first = torch.autograd.grad((loss * grad.float()).sum(), [x for x in leaves if x is not None], retain_graph=True)
    second = torch.autograd.grad((loss * grad.float()).sum(), [x for x in leaves if x is not None])
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kept_chunks_of_live_graphs_are_never_shared(dtype):
    """The kept chunk's storage is reused from the last step once its graph is freed (_workspace.storage);
    two graphs alive at once each keep their own, and each backward gives its own loss's gradients."""
    case = _case(33, 24, dtype, LAYOUTS[0])
    inputs = [make_inputs(case) for _ in range(2)]

    def forward(i):
        a, b, s, _, _ = inputs[i]
        leaves = [x.clone().requires_grad_() for x in (a, b, s)]
        return leaves, vlfast.clip_loss(*leaves, reduction="none", impl="torch")

    alone = []
    for i in range(2):
        leaves, loss = forward(i)
        alone.append(torch.autograd.grad((loss * inputs[i][4].float()).sum(), leaves))
    held = [forward(i) for i in range(2)]  # both graphs alive: two kept chunks (one shared: the first's wrong)
    for i in (1, 0):
        leaves, loss = held[i]
        got = torch.autograd.grad((loss * inputs[i][4].float()).sum(), leaves)
        for x, y in zip(got, alone[i]):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
def test_backward_without_kept_products_recomputes_them(layout, dtype):
    """stats copied (as a graph that moves it might): nothing kept behind it, the same gradients (bf16:
    within the bf16 rounding of G, whose float32 value differs by rounding between the two paths)."""
    case = _case(40, 24, dtype, layout)
    a, b, s, bias, grad = make_inputs(case)
    kind, sym, off = case.kind, case.symmetric, -1 if case.offset is None else case.offset
    _, stats = torch_impl.forward(a, b, s, bias, kind, sym, off)
    assert torch_impl.kept_chunk(stats, case.m, torch_impl._kept_planes(kind, case.dtype)) is not None
    assert torch_impl.kept_chunk(stats.clone(), case.m, torch_impl._kept_planes(kind, case.dtype)) is None
    kept = torch_impl.backward(grad, a, b, s, bias, stats, kind, sym, off)
    again = torch_impl.backward(grad, a, b, s, bias, stats.clone(), kind, sym, off)
    tol = 1e-12 if dtype == torch.float64 else 1e-2
    for x, y in zip(kept, again):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol * float(y.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("gap", [None, float("-inf")], ids=["default-gap", "always-two-exponentials"])
def test_far_column_gradient(dtype, gap, monkeypatch):
    """A text far from every image at scale 100: its column's log-sum-exp sits ~200 nats below the top
    row's, past MAX_COLUMN_GAP, so the backward exponentiates the column softmax itself. With the gap
    at -inf every case takes that path; either way, the float64 spec."""
    if gap is not None:
        monkeypatch.setattr(torch_impl, "MAX_COLUMN_GAP", gap)
    n, d = 45, 32
    u = F.normalize(torch.randn(1, d, dtype=torch.float64), dim=-1)
    img = F.normalize(u + 0.3 * F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1), dim=-1)
    txt = F.normalize(u + 0.3 * F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1), dim=-1)
    txt[7] = -img[7]  # column 7: every logit near -100, the others near +100
    case = Case(n=n, m=n, d=d, dtype=dtype, scale=100.0)
    a, b, s, bias, grad = make_inputs(case, img, txt)
    ref = reference64(case, a, b, s, bias, grad)
    got = run_vlfast(case, "torch", a, b, s, bias, grad)
    assert_close64(got, ref, 1e-10 if dtype == torch.float64 else 2e-5, f"far column {dtype}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_zero_scale(layout, dtype):
    """logit_scale 0 (allowed: every logit equals the bias): the row maxima, the folded scale of the
    bf16 gradient and d_scale (which then cannot come from s * dot) all stay finite and right."""
    _check(_case(37, 24, dtype, layout, scale=0.0), "torch")


def test_backward_reuses_its_gradient_buffer_across_calls():
    """The G buffer stays with the thread between calls (no allocation, no page faults), and a
    smaller problem after a larger one still gets the right gradients from the same buffer."""
    case = _case(64, 24, torch.float64, LAYOUTS[0])
    a, b, s, bias, grad = make_inputs(case)
    run_vlfast(case, "torch", a, b, s, bias, grad)
    first = torch_impl._chunk_buffer("g", 1, 1, torch.float64, "cpu").data_ptr()
    small = _case(9, 24, torch.float64, LAYOUTS[0])
    a2, b2, s2, bias2, grad2 = make_inputs(small)
    got = run_vlfast(small, "torch", a2, b2, s2, bias2, grad2)
    assert torch_impl._chunk_buffer("g", 1, 1, torch.float64, "cpu").data_ptr() == first
    assert_close64(got, reference64(small, a2, b2, s2, bias2, grad2), 1e-10, "after a larger call", floor=1e-2)


def test_backward_in_two_threads_at_once():
    """Each thread its own G buffer: concurrent backwards give the single-threaded gradients."""
    import threading
    cases = [_case(300, 64, torch.float32, LAYOUTS[0]), _case(250, 64, torch.float32, LAYOUTS[2])]
    inputs = [make_inputs(c) for c in cases]
    alone = [run_vlfast(c, "torch", *x) for c, x in zip(cases, inputs)]
    together = [None, None]

    def work(i):
        for _ in range(5):
            together[i] = run_vlfast(cases[i], "torch", *inputs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for want, got in zip(alone, together):
        for name in want:
            if want[name] is not None:
                torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6 * float(want[name].abs().max()))


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_in_several_chunks(layout, dtype, monkeypatch):
    """bf16 / fp16 features with rows in chunks of 7: recomputed products, d_b summed over chunks
    (bf16: as (a^T G)^T), still the float64 spec within the low-precision rule."""
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", 7 * 60)
    _check(_case(50, 40, dtype, layout), "torch")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_eager_calls_skip_the_op_boundary_and_match_it(kind):
    """Plain eager calls run the ops' bodies without the torch.library dispatch (~90 us a call on a CPU,
    12 % of a 512 x 256 loss); the same call through the ops (a function mode forces them) gives the same
    loss and gradients bit for bit, for every input that has one."""
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randn(37, 16, generator=g, requires_grad=True) for _ in range(2))
    scale = torch.tensor(7.5, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True) if kind == "sigmoid" else None

    def run():
        loss = vlfast.clip_loss(a, b, scale, bias, kind=kind, impl="torch")
        leaves = [x for x in (a, b, scale, bias) if x is not None]
        return [loss.detach(), *torch.autograd.grad(loss, leaves)]

    with torch.profiler.profile() as prof:
        eager = run()
    names = {e.name for e in prof.events()}
    assert not any(n.startswith("vlfast::") for n in names), sorted(n for n in names if "vlfast" in n)

    class Passthrough(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with torch.profiler.profile() as prof, Passthrough():
        through_ops = run()
    assert "vlfast::clip_loss_forward" in {e.name for e in prof.events()}
    for got, want in zip(eager, through_ops):
        assert torch.equal(got, want)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_loss_without_gradients_is_the_loss_with_them(kind, dtype):
    """A call that wants no gradient keeps no chunk for a backward (scratch instead): the same loss, bit for
    bit, as the call that keeps it, with and without a bias, symmetric or not."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randn(45, 24, generator=g).to(dtype) for _ in range(2))
    for bias, symmetric in ((None, True), (torch.tensor(-1.5), True), (None, False)):
        if kind == "sigmoid" and not symmetric:
            continue
        args = dict(logit_bias=bias, kind=kind, symmetric=symmetric, reduction="none", impl="torch")
        with torch.no_grad():
            plain = vlfast.clip_loss(a, b, torch.tensor(9.0), **args)
        with_grad = vlfast.clip_loss(a.clone().requires_grad_(), b, torch.tensor(9.0), **args)
        assert torch.equal(plain, with_grad.detach())
