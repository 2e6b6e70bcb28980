"""Inputs, the float64 reference and the same-dtype PyTorch baseline for the contrastive-loss tests.

Shared by the CPU tests (reference + Triton interpreter) and the GPU tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import vlfast
from vlfast.ops.clip_loss.reference import clip_loss_dense, positive_mask

NAMES = ("loss", "image", "text", "scale", "bias")


@dataclass
class Case:
    n: int
    m: int
    d: int
    dtype: torch.dtype
    kind: str = "softmax"
    symmetric: bool = True
    offset: Optional[int] = 0
    scale: float = 14.3  # CLIP's initial exp(log(1/0.07))
    bias: Optional[float] = None
    normalize: bool = True
    device: str = "cpu"


def make_inputs(case: Case, img=None, txt=None):
    """Features (fresh random unless given), scale and bias tensors, and an upstream gradient (N,)."""
    if img is None:
        img = torch.randn(case.n, case.d, dtype=torch.float64)
        txt = torch.randn(case.m, case.d, dtype=torch.float64)
        if case.normalize:
            img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    dev = case.device
    a = img.to(dev, case.dtype)
    b = txt.to(dev, case.dtype)
    sdt = torch.float64 if case.dtype == torch.float64 else torch.float32  # a float32 scale gets a float32 grad
    s = torch.tensor(case.scale, dtype=sdt, device=dev)
    bias = None if case.bias is None else torch.tensor(case.bias, dtype=sdt, device=dev)
    grad = torch.rand(case.n, dtype=torch.float64, device=dev) + 0.5
    return a, b, s, bias, grad


def _leaf(x, dtype=None):
    if x is None:
        return None
    return x.detach().to(dtype or x.dtype).clone().requires_grad_(True)


def _collect(loss, grad, leaves, names=NAMES):
    """{"loss": ..., name: gradient} after backward of sum(grad * loss); names[0] is the loss."""
    (loss.double() * grad).sum().backward()
    out = {"loss": loss.detach().double()}
    for name, x in zip(names[1:], leaves):
        out[name] = None if x is None else x.grad.detach().double()
    return out


def _offset(case: Case) -> int:
    return -1 if case.offset is None else case.offset


def reference64(case: Case, a, b, s, bias, grad):
    """Per-row losses and every gradient from the dense spec in float64."""
    leaves = [_leaf(a, torch.float64), _leaf(b, torch.float64), _leaf(s, torch.float64), _leaf(bias, torch.float64)]
    loss = clip_loss_dense(*leaves, case.kind, case.symmetric and case.kind == "softmax", _offset(case))
    return _collect(loss, grad, leaves)


def pytorch_same_dtype(case: Case, a, b, s, bias, grad):
    """What a user writes today: logits in the input dtype, the loss in float32 (as the anchors)."""
    leaves = [_leaf(a), _leaf(b), _leaf(s), _leaf(bias)]
    la, lb, ls, lbias = leaves
    logits = ls.to(a.dtype) * (la @ lb.T)
    if lbias is not None:
        logits = logits + lbias.to(a.dtype)
    logits = logits.float()
    if case.kind == "softmax":
        rows = torch.arange(case.n, device=a.device)
        loss = F.cross_entropy(logits, rows + case.offset, reduction="none")
        if case.symmetric:
            loss = (loss + F.cross_entropy(logits.T, rows, reduction="none")) / 2
    else:
        sign = positive_mask(case.n, case.m, _offset(case), a.device).float() * 2 - 1
        loss = -F.logsigmoid(sign * logits).sum(dim=1)
    return _collect(loss, grad, leaves)


def run_vlfast(case: Case, impl: str, a, b, s, bias, grad, reduction="none"):
    leaves = [_leaf(a), _leaf(b), _leaf(s), _leaf(bias)]
    loss = vlfast.clip_loss(*leaves, kind=case.kind, reduction=reduction, symmetric=case.symmetric,
                            positive_offset=case.offset, impl=impl)
    if reduction != "none":
        grad = torch.ones((), dtype=torch.float64, device=a.device)
    return _collect(loss, grad, leaves)


def max_err(x, ref) -> float:
    return float((x - ref).abs().max()) if x.numel() else 0.0


def assert_relative_rule(got: dict, ref: dict, base: dict, rel_atol: float, context: str = "",
                         floor: float = 1e-30):
    """err(vlfast vs fp64) <= 2 * err(same-dtype PyTorch vs fp64) + rel_atol * max(max|ref|, floor),
    for every output the reference has (whatever the dicts' names)."""
    assert any(v is not None for v in ref.values()), f"{context}: nothing to compare"
    for name in ref:
        if ref[name] is None:
            continue
        assert torch.isfinite(got[name]).all(), f"{context} {name}: non-finite values"
        e, e_base = max_err(got[name], ref[name]), max_err(base[name], ref[name])
        bound = 2 * e_base + rel_atol * max(float(ref[name].abs().max()), floor)
        assert e <= bound, f"{context} {name}: error {e:.3e} > bound {bound:.3e} (PyTorch same dtype {e_base:.3e})"


def assert_close64(got: dict, ref: dict, rtol: float, context: str = "", floor: float = 1e-300):
    """Every output within rtol * max(max|ref|, floor) of the float64 reference.

    floor covers d_scale of the softmax loss: a sum of O(1) terms that cancel to a small total.
    """
    assert any(v is not None for v in ref.values()), f"{context}: nothing to compare"
    for name in ref:
        if ref[name] is None:
            continue
        assert torch.isfinite(got[name]).all(), f"{context} {name}: non-finite values"
        scale = max(float(ref[name].abs().max()), floor)
        e = max_err(got[name], ref[name])
        assert e <= rtol * scale, f"{context} {name}: error {e:.3e} > {rtol:.0e} * {scale:.3e}"




# --- checks that every GPU implementation passes (test_clip_loss_gpu.py, test_clip_loss_cuda_gpu.py) ---

def check_backward_is_bitwise_deterministic(impl: str, kind: str):
    a = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(3000, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    grads = []
    for _ in range(2):
        vlfast.clip_loss(a, b, s, kind=kind, impl=impl).backward()
        grads.append([x.grad.clone() for x in (a, b, s)])
        a.grad = b.grad = s.grad = None
    for g1, g2 in zip(*grads):
        assert torch.equal(g1, g2)


def check_extra_memory_stays_linear_in_n(impl: str):
    """16384 x 768 bf16 forward + backward: the goal is <= 0.3 GB beyond inputs and gradients."""
    n, d = 16384, 768
    a = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(14.0, device="cuda", requires_grad=True)
    vlfast.clip_loss(a, b, s, impl=impl).backward()  # warm-up: autotuning allocates too
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # inputs and their (kept) gradients
    vlfast.clip_loss(a, b, s, impl=impl).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 0.3e9, f"extra memory {extra / 1e9:.3f} GB"


def check_compile_fullgraph(impl: str, kind: str):
    torch._dynamo.reset()
    a = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(2.5, device="cuda", requires_grad=True)

    def step(a, b, s):
        return vlfast.clip_loss(a, b, s.exp(), -2.0, kind=kind, impl=impl)

    out = torch.compile(step, fullgraph=True)(a, b, s)
    out.backward()
    g = [x.grad.clone() for x in (a, b, s)]
    a.grad = b.grad = s.grad = None
    step(a, b, s).backward()
    torch.testing.assert_close(out, step(a, b, s))
    for x, y in zip(g, (a.grad, b.grad, s.grad)):
        torch.testing.assert_close(x, y)
