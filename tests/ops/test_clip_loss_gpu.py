"""The Triton kernels on a GPU at real sizes (run by benchmarks/gpu_check.sh; skipped without CUDA)."""
import pytest
import torch

import vlfast

from .clip_loss_cases import (Case, assert_relative_rule, check_backward_is_bitwise_deterministic,
                              check_compile_fullgraph, check_extra_memory_stays_linear_in_n, make_inputs,
                              pytorch_same_dtype, reference64, run_vlfast)

pytestmark = pytest.mark.gpu

LAYOUTS = [("softmax", True, 0, 0), ("softmax", False, 64, 200), ("sigmoid", True, 0, 0), ("sigmoid", True, None, 33)]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 32), (7, 100), (97, 512), (1000, 768), (1025, 72), (4097, 256)])
def test_triton_matches_float64_on_gpu(n, d, dtype, layout, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    kind, symmetric, offset, extra = layout
    case = Case(n=n, m=n + extra, d=d, dtype=dtype, kind=kind, symmetric=symmetric, offset=offset,
                bias=-5.0 if kind == "sigmoid" else None, scale=30.0, device="cuda")
    a, b, s, bias, grad = make_inputs(case)
    ref = reference64(case, a, b, s, bias, grad)
    got = run_vlfast(case, "triton", a, b, s, bias, grad)
    base = pytorch_same_dtype(case, a, b, s, bias, grad)
    assert_relative_rule(got, ref, base, ATOL[dtype], f"triton {case}")


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_backward_is_bitwise_deterministic(kind):
    check_backward_is_bitwise_deterministic("triton", kind)


def test_extra_memory_stays_linear_in_n():
    check_extra_memory_stays_linear_in_n("triton")


def test_auto_picks_triton_on_gpu(monkeypatch):
    from vlfast.ops import clip_loss as op
    seen = []
    real = op._FORWARD["triton"]
    monkeypatch.setitem(op._FORWARD, "triton", lambda *args: seen.append(1) or real(*args))
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    vlfast.clip_loss(x, x, 1.0)
    assert seen


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_compile_fullgraph_on_gpu(kind):
    check_compile_fullgraph("triton", kind)
