"""attention_varlen under torch.compile(fullgraph=True): its offset checks must not break the graph."""
import pytest
import torch

from vlfast.masks import Mask
from vlfast.ops.attention import attention_varlen


def _packed(lengths, heads=3, head_dim=5):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t = int(cu[-1])
    q, k, v = (torch.randn(t, heads, head_dim, dtype=torch.float64, requires_grad=True) for _ in range(3))
    return q, k, v, cu, max(lengths)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_varlen_fullgraph_compile_matches_eager(impl):
    torch._dynamo.reset()
    q, k, v, cu, longest = _packed([3, 0, 7, 2])
    do = torch.randn_like(q)

    def run(q, k, v, cu):
        return attention_varlen(q, k, v, cu, cu, longest, longest, mask=Mask(causal=True), impl=impl)

    out = run(q, k, v, cu)
    grads = torch.autograd.grad(out, (q, k, v), do)
    out_c = torch.compile(run, fullgraph=True, backend="aot_eager")(q, k, v, cu)
    grads_c = torch.autograd.grad(out_c, (q, k, v), do)
    torch.testing.assert_close(out_c, out)
    for g_c, g in zip(grads_c, grads):
        torch.testing.assert_close(g_c, g)


@pytest.mark.parametrize("bad, match", [([0, 3, 2, 12], "never decrease"), ([1, 3, 5, 12], "start at 0"),
                                        ([0, 3, 5, 11], "end at the 12"), ([0, 8, 10, 12], "longer than max_seqlen")])
def test_varlen_bad_offsets_still_raise_eagerly(bad, match):
    q, k, v, cu, longest = _packed([3, 2, 7])
    bad = torch.tensor(bad, dtype=torch.int32)
    with pytest.raises(ValueError, match=f"cu_seqlens_q.*{match}|{match}.*cu_seqlens_q"):
        attention_varlen(q, k, v, bad, cu, longest, longest, impl="torch")
