"""The torch.library boundary: opcheck on both ops, torch.compile(fullgraph=True) forward and backward."""
import pytest
import torch

import vlfast
from vlfast.ops.clip_loss import clip_loss_backward, clip_loss_forward

IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


def _args(kind, symmetric, offset, n=9, m=9, d=20, bias=True):
    a = torch.randn(n, d, requires_grad=True)
    b = torch.randn(m, d, requires_grad=True)
    s = torch.tensor(4.0, requires_grad=True)
    bb = torch.tensor(-1.0, requires_grad=True) if bias else None
    return a, b, s, bb, kind, symmetric, offset


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind,symmetric,offset,m", [("softmax", True, 0, 9), ("softmax", False, 2, 13),
                                                     ("sigmoid", True, -1, 12)])
def test_opcheck(impl, kind, symmetric, offset, m):
    args = _args(kind, symmetric, offset, m=m)
    torch.library.opcheck(clip_loss_forward, args + (impl,))
    loss, stats = clip_loss_forward(*args, impl)
    a, b, s, bb = args[:4]
    torch.library.opcheck(clip_loss_backward, (torch.rand(9), a.detach(), b.detach(), s.detach(), bb.detach(),
                                               stats.detach(), kind, symmetric, offset, impl, True, False))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_compile_fullgraph_forward_and_backward(impl, kind):
    torch._dynamo.reset()

    def step(a, b, s, bias):
        return vlfast.clip_loss(a, b, s.exp(), bias, kind=kind, impl=impl) * 2

    a, b = torch.randn(11, 24, requires_grad=True), torch.randn(11, 24, requires_grad=True)
    s, bias = torch.tensor(2.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(a, b, s, bias)
    out.backward()
    grads = [x.grad.clone() for x in (a, b, s, bias)]
    for x in (a, b, s, bias):
        x.grad = None
    want = step(a, b, s, bias)
    want.backward()
    torch.testing.assert_close(out, want)
    for g, x in zip(grads, (a, b, s, bias)):
        torch.testing.assert_close(g, x.grad)
