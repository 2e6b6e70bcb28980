"""The fused linear cross-entropy on a GPU at real sizes (run by benchmarks/gpu_check.sh)."""
import pytest
import torch

import vlfast

from .clip_loss_cases import assert_relative_rule
from .linear_cross_entropy_cases import IGNORE, Case, make_inputs, pytorch_same_dtype, reference64, run_vlfast

pytestmark = pytest.mark.gpu
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}
OPTIONS = [("mean", 0.0, None, 0.0, False), ("none", 0.1, 30.0, 1e-4, True), ("sum", 0.0, None, 1e-4, False)]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,h,v", [(1, 64, 1), (33, 100, 97), (1000, 64, 32000), (33, 4096, 50257), (4097, 256, 3001)])
def test_triton_matches_float64_on_gpu(n, h, v, dtype, option, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    reduction, eps, cap, zl, bias = option
    case = Case(n, h, v, dtype, reduction, eps, cap, zl, bias, device="cuda")
    hidden, weight, b, targets, grad = make_inputs(case)
    ref = reference64(case, hidden, weight, b, targets, grad)
    got = run_vlfast(case, "triton", hidden, weight, b, targets, grad)
    base = pytorch_same_dtype(case, hidden, weight, b, targets, grad)
    assert_relative_rule(got, ref, base, ATOL[dtype], f"triton {case}",
                         floor=_rounding_floor(case, hidden, weight, b, ATOL[dtype]))


def _rounding_floor(case: Case, hidden, weight, bias, rel_atol: float) -> float:
    """The loss is lse - z_t + ...: float32 terms of the logits' size that cancel. Its error is relative
    to them, not to the loss, which can be far smaller: with V = 1 the cross-entropy is exactly 0 and
    z_loss * lse^2 is left, and a fused multiply-add in the kernel leaves lse - z_t at a fraction of an
    ulp of z (measured on an H100: 1.6e-9 beside a loss of 1.3e-5). 4 float32 ulps of max |z|, as a
    floor of the scale that rel_atol multiplies."""
    z = torch.nn.functional.linear(hidden.double(), weight.double(), None if bias is None else bias.double())
    if case.softcap:
        z = case.softcap * torch.tanh(z / case.softcap)
    return 4 * torch.finfo(torch.float32).eps * float(z.abs().max()) / rel_atol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_sixteen_chunks_of_weight_gradient_keep_the_rule(dtype, monkeypatch):
    """4096 rows in 16 default-sized chunks: d_weight summed in scaled float16 (weight_grad.py)."""
    monkeypatch.setenv("VLFAST_POISON", "1")
    case = Case(4096, 512, 32000, dtype, "mean", 0.0, None, 1e-4, False, device="cuda")
    hidden, weight, b, targets, grad = make_inputs(case)
    ref = reference64(case, hidden, weight, b, targets, grad)
    got = run_vlfast(case, "triton", hidden, weight, b, targets, grad)
    base = pytorch_same_dtype(case, hidden, weight, b, targets, grad)
    assert_relative_rule(got, ref, base, ATOL[dtype], f"triton {case}")


def _goal_inputs():
    torch.manual_seed(0)
    n, h, v = 8192, 4096, 32064
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    targets[::7] = IGNORE
    return hidden, weight, targets


def test_backward_is_bitwise_deterministic():
    hidden, weight, targets = _goal_inputs()
    grads = []
    for _ in range(2):
        vlfast.linear_cross_entropy(hidden, weight, targets, impl="triton").backward()
        grads.append((hidden.grad.clone(), weight.grad.clone()))
        hidden.grad = weight.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_extra_memory_is_the_gradients_plus_one_chunk():
    """Beyond d_hidden and d_weight themselves, one chunk of float32 logits (G is written over them),
    whatever V is: 346 MiB in all at the goal size, under the issue's 0.35 GB (350 MiB as measured)."""
    from vlfast.ops.linear_cross_entropy import triton as tri
    hidden, weight, targets = _goal_inputs()
    vlfast.linear_cross_entropy(hidden, weight, targets, impl="triton").backward()  # warm-up
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vlfast.linear_cross_entropy(hidden, weight, targets, impl="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = hidden.numel() * 2 + weight.numel() * 2
    chunk = tri._chunk_rows(hidden.shape[0], weight.shape[0]) * weight.shape[0] * 4
    assert extra <= grads + chunk + (2 << 20), f"{extra / 2**20:.1f} MiB extra"
    assert extra <= 350 * 2**20, f"{extra / 2**20:.1f} MiB extra"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_on_gpu(reduction):
    torch._dynamo.reset()
    h = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 1000, (300,), device="cuda")

    def step(h, w):
        out = vlfast.linear_cross_entropy(h, w, t, reduction=reduction, z_loss=1e-4)
        return out.sum() if reduction == "none" else out

    out = torch.compile(step, fullgraph=True)(h, w)
    out.backward()
    g = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    step(h, w).backward()
    torch.testing.assert_close(g[0], h.grad)
    torch.testing.assert_close(g[1], w.grad)
