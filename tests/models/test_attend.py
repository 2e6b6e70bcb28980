"""vlfast.models._attention.attend: the masks' meaning against an explicit float64 softmax."""
import pytest
import torch

from vlfast.models._attention import attend


def _reference(q, k, v, causal, keep):
    """softmax over the allowed keys, written out; rows with no allowed key give 0."""
    s = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = torch.ones(q.shape[0], 1, s, s, dtype=torch.bool)
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool).tril()
    if keep is not None:
        allowed = allowed & keep[:, None, None, :]
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return weights @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padding", ["none", "right", "left"])
def test_matches_explicit_softmax(causal, padding):
    b, h, s, d = 3, 2, 7, 8
    q, k, v = (torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = None
    if padding != "none":
        keep = torch.arange(s)[None, :] < torch.tensor([7, 4, 1])[:, None]
        keep = keep if padding == "right" else keep.flip(-1)
    got = attend(q, k, v, causal=causal, key_padding_mask=keep)
    want = _reference(q, k, v, causal, keep)
    if keep is not None:  # padded queries: the packed path computes nothing there and gives 0
        assert (got.transpose(1, 2)[~keep] == 0).all()
        want = want.masked_fill(~keep[:, None, :, None], 0.0)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(got)
    grads = torch.autograd.grad(got, (q, k, v), g)
    for a, b_ in zip(grads, torch.autograd.grad(want, (q, k, v), g)):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-12)
    if padding == "left" and causal:  # real keys are the last 4 / last 1: causal queries before them see none
        assert (got[1, :, :3] == 0).all() and (got[2, :, :6] == 0).all()
        assert (grads[0][2, :, :6] == 0).all()


def test_bad_arguments_are_named():
    q = torch.randn(2, 2, 5, 4)
    with pytest.raises(ValueError, match="q, k, v must share one shape"):
        attend(q, q[:, :, :4], q, causal=False)
    with pytest.raises(ValueError, match=r"key_padding_mask must be \(batch, seq\) = \(2, 5\)"):
        attend(q, q, q, causal=True, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        attend(q, q, q, causal=True, key_padding_mask=torch.ones(2, 5))
