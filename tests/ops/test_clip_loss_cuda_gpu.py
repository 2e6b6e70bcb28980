"""The CUDA C++ kernels (impl="cuda") on a GPU: the same float64 parity and relative rule as the Triton
kernels (test_clip_loss_gpu.py), the cases that broke other libraries, determinism, streams, memory.
Run by benchmarks/gpu_check.sh after it builds vlfast._C; skipped without CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

import vlfast
from vlfast._backends import extension

from .clip_loss_cases import (Case, assert_close64, assert_relative_rule, check_backward_is_bitwise_deterministic,
                              check_compile_fullgraph, check_extra_memory_stays_linear_in_n, make_inputs,
                              pytorch_same_dtype, reference64, run_vlfast)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(extension()[0] is None, reason=f"vlfast._C is not built: {extension()[1]}")]

LAYOUTS = [("softmax", True, 0, 0), ("softmax", False, 64, 200), ("sigmoid", True, 0, 0), ("sigmoid", True, None, 33)]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


def _check(case, rel_atol=None, img=None, txt=None):
    a, b, s, bias, grad = make_inputs(case, img, txt)
    ref = reference64(case, a, b, s, bias, grad)
    got = run_vlfast(case, "cuda", a, b, s, bias, grad)
    base = pytorch_same_dtype(case, a, b, s, bias, grad)
    assert_relative_rule(got, ref, base, rel_atol or ATOL[case.dtype], f"cuda {case}")
    return got


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 32), (7, 100), (97, 512), (1000, 768), (1025, 72), (4097, 256)])
def test_cuda_matches_float64_on_gpu(n, d, dtype, layout, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")  # scratch starts as NaN: unwritten elements would show
    kind, symmetric, offset, extra = layout
    _check(Case(n=n, m=n + extra, d=d, dtype=dtype, kind=kind, symmetric=symmetric, offset=offset,
                bias=-5.0 if kind == "sigmoid" else None, scale=30.0, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_many_column_splits_and_row_chunks(dtype, monkeypatch):
    from vlfast.ops.clip_loss import partials
    monkeypatch.setenv("VLFAST_POISON", "1")
    monkeypatch.setattr(partials, "GRAD_CHUNK_BYTES", 128 * 1500 * 4)  # chunks of 128 rows
    monkeypatch.setattr(partials, "column_splits",  # one column tile per split
                        lambda row_blocks, m, device, step: (-(-m // step), step))
    for kind, symmetric, offset, extra in LAYOUTS:
        _check(Case(n=1300, m=1300 + extra, d=200, dtype=dtype, kind=kind, symmetric=symmetric, offset=offset,
                    bias=-3.0 if kind == "sigmoid" else None, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_not_on_16_byte_boundaries(dtype):
    """A view starting mid-row and a feature size whose rows are not 16-byte multiples (copied once)."""
    for d in (33, 100):
        big = F.normalize(torch.randn(301, d, dtype=torch.float64), dim=-1)
        case = Case(n=300, m=300, d=d, dtype=dtype, device="cuda")
        a, b, s, bias, grad = make_inputs(case, big[1:], F.normalize(torch.randn(300, d, dtype=torch.float64), dim=-1))
        view = torch.cat([torch.zeros(1, d, dtype=dtype, device="cuda"), a])[1:]
        ref = reference64(case, view, b, s, bias, grad)
        got = run_vlfast(case, "cuda", view, b, s, bias, grad)
        assert_relative_rule(got, ref, pytorch_same_dtype(case, view, b, s, bias, grad), ATOL[dtype], f"d={d}")


def test_near_perfect_pairs_keep_relative_accuracy():
    """Loss ~1e-11 at scale 100: kept to a relative 1e-3 (float32 PyTorch rounds it away)."""
    from .test_clip_loss import _margin_form_softmax64
    n, d = 256, 48
    shared = F.normalize(torch.randn(1, d, dtype=torch.float64), dim=-1) * 1.5
    img = F.normalize(shared + F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1), dim=-1)
    case = Case(n=n, m=n, d=d, dtype=torch.float32, scale=100.0, device="cuda")
    a, b, s, bias, grad = make_inputs(case, img, img.clone())
    ref = _margin_form_softmax64(a.cpu(), b.cpu(), s.cpu(), grad.cpu())
    got = {k: (v.cpu() if v is not None else None) for k, v in run_vlfast(case, "cuda", a, b, s, bias, grad).items()}
    assert 1e-13 < float(ref["loss"].min()) < 1e-9
    assert_close64(got, ref, 1e-3, "cuda near-perfect")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_scale_100_and_duplicates(kind):
    _check(Case(n=500, m=500, d=64, dtype=torch.float32, kind=kind, scale=100.0,
                bias=-10.0 if kind == "sigmoid" else None, device="cuda"))
    img = torch.randn(300, 40, dtype=torch.float64) * 3
    img[5] = img[17] = img[30]  # tied logits
    _check(Case(n=300, m=300, d=40, dtype=torch.float32, kind=kind, scale=2.0, normalize=False, device="cuda"),
           img=img, txt=torch.randn(300, 40, dtype=torch.float64) * 3)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_backward_is_bitwise_deterministic(kind):
    check_backward_is_bitwise_deterministic("cuda", kind)


def test_runs_on_the_current_stream():
    a = torch.randn(2000, 256, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(2000, 256, device="cuda", dtype=torch.bfloat16)
    want = vlfast.clip_loss(a, b, 10.0, impl="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = vlfast.clip_loss(a, b, 10.0, impl="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


def test_extra_memory_stays_linear_in_n():
    check_extra_memory_stays_linear_in_n("cuda")


def test_auto_keeps_triton_until_cuda_is_measured_faster(monkeypatch):
    from vlfast import _dispatch
    from vlfast.ops import clip_loss as op
    if _dispatch.AUTO_PREFERS_CUDA["clip_loss"]:
        pytest.skip("clip_loss's CUDA kernels are auto's choice now")
    seen = []
    monkeypatch.setitem(op._FORWARD, "cuda", lambda *args: seen.append("cuda"))
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    vlfast.clip_loss(x, x, 1.0)
    assert not seen


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_compile_fullgraph(kind):
    check_compile_fullgraph("cuda", kind)


def test_host_memory_is_refused_by_the_extension():
    ext = extension()[0]
    x = torch.randn(8, 64, dtype=torch.bfloat16)  # on the CPU
    y = torch.randn(8, 64, dtype=torch.bfloat16, device="cuda")
    s = torch.tensor(1.0, device="cuda")
    out = torch.empty(8, device="cuda")
    with pytest.raises(ValueError, match="argument 'a' is not device memory"):
        ext.clip_loss_positive(a=x.data_ptr(), b=y.data_ptr(), scale=s.data_ptr(), bias=0, out=out.data_ptr(), n=8,
                               m=8, d=64, offset=0, stride_a=64, stride_b=64, dtype=ext.DTYPE_CODES["bfloat16"],
                               device=0, stream=torch.cuda.current_stream().cuda_stream)
