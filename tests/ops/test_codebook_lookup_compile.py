"""The torch.library boundary of codebook_lookup: opcheck, torch.compile(fullgraph=True)."""
import pytest
import torch

import vlfast
from vlfast.ops.codebook_lookup import codebook_lookup_forward

IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n", [0, 13])
def test_opcheck(impl, metric, n):
    z, e = torch.randn(n, 20), torch.randn(37, 20)
    torch.library.opcheck(codebook_lookup_forward, (z, e, metric, impl))


@pytest.mark.parametrize("impl", IMPLS)
def test_compile_fullgraph(impl):
    torch._dynamo.reset()

    def step(z, e):  # the lookup inside a VQ step: gather, straight-through, losses
        index, dist = vlfast.codebook_lookup(z, e, impl=impl)
        q = e[index]
        return z + (q - z).detach(), dist.mean() + (q - z.detach()).pow(2).mean()

    z = torch.randn(2, 9, 16, requires_grad=True)
    e = torch.randn(50, 16, requires_grad=True)
    out, loss = torch.compile(step, fullgraph=True)(z, e)
    (out.sum() + loss).backward()
    grads = [z.grad.clone(), e.grad.clone()]
    z.grad = e.grad = None
    want_out, want_loss = step(z, e)
    (want_out.sum() + want_loss).backward()
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grads[0], z.grad)
    torch.testing.assert_close(grads[1], e.grad)
