"""vlfast's CLIP on a CUDA device: float32 and bf16 autocast against transformers, and a training step
with the GPU ClipLoss. Run by benchmarks/gpu_check.sh (pytest -m gpu)."""
import pytest
import torch

from vlfast.loaders import clip_from_transformers
from vlfast.nn import ClipLoss

from .common import hf_model, hf_outputs, pixels, text_batch, vlfast_outputs

pytestmark = pytest.mark.gpu


def _err(x, ref):
    return ((x.double().cpu() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_cuda_outputs_and_loss_within_twice_transformers_error(bf16):
    """err(vlfast vs float64) <= 2 * err(transformers, same precision, same device) + 1e-4."""
    hf64 = hf_model()
    images, (ids, mask) = pixels(4), text_batch()
    with torch.no_grad():
        ref = hf_outputs(hf64, images, ids, mask)
    ref_loss = hf64(input_ids=ids, pixel_values=images, attention_mask=mask, return_loss=True).loss.detach()
    ours = clip_from_transformers(hf64.state_dict(), hf64.config).cuda()
    theirs = hf64.float().cuda()
    x = (images.float().cuda(), ids.cuda(), mask.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        got = vlfast_outputs(ours, *x)
        peer = hf_outputs(theirs, *x)
        loss = ClipLoss()(*ours(*x))
        peer_loss = theirs(input_ids=x[1], pixel_values=x[0], attention_mask=x[2], return_loss=True).loss
    for name, g, p, r in zip(("image", "text", "logits"), got, peer, ref):
        assert _err(g, r) <= 2 * _err(p, r) + 1e-4, (name, _err(g, r), _err(p, r))
    assert _err(loss, ref_loss) <= 2 * _err(peer_loss, ref_loss) + 1e-4
    loss.backward()
    grads = [p.grad for p in ours.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
