"""vlfast.nn.ClipLoss / SigLipLoss against open_clip's modules in one process: loss and every gradient."""
import math
import sys

import pytest
import torch

import vlfast
from vlfast import ImplUnavailableError
from vlfast.nn import ClipLoss, SigLipLoss

from .common import loss_and_grads, open_clip_loss_or_skip

oc = open_clip_loss_or_skip()

D = 24
CLIP_SCALE = 1 / 0.07  # open_clip's initial exp(logit_scale)
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0  # SigLIP's initialisation


def make_inputs(n, dtype=torch.float64, bias=0.0, scale=CLIP_SCALE, d=D):
    """Unit-norm features (n, d) as the towers produce, a scale () and an optional bias ()."""
    image = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    text = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    scale_t = torch.tensor(scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    bias_t = None if bias is None else torch.tensor(bias, dtype=scale_t.dtype)
    return image, text, scale_t, bias_t


def as_float64(inputs):
    return [None if t is None else t.double() for t in inputs]


def assert_matches(got, want, rtol=1e-10, atol=1e-12):
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, rtol=rtol, atol=atol)
    assert len(grads) == len(want_grads)
    for name, g, w in zip(("image", "text", "logit_scale", "logit_bias"), grads, want_grads):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"d/d{name}: {m}")


# (vlfast module, open_clip module, scale, bias) for each loss; ClipLoss ignores its bias but takes one.
BOTH_LOSSES = pytest.mark.parametrize("ours, theirs, scale, bias", [
    (ClipLoss, oc.ClipLoss, CLIP_SCALE, 0.5),
    (SigLipLoss, oc.SigLipLoss, SIGLIP_SCALE, SIGLIP_BIAS),
], ids=["clip", "siglip"])

CLIP_CONFIGS = [{}, {"local_loss": True, "gather_with_grad": True, "cache_labels": True}]


@pytest.mark.parametrize("n", [1, 7, 97])
@pytest.mark.parametrize("bias", [None, 0.5])
@pytest.mark.parametrize("config", CLIP_CONFIGS, ids=["plain", "flags"])
def test_clip_loss_matches_open_clip_float64(n, bias, config):
    inputs = make_inputs(n, bias=bias)
    got = loss_and_grads(ClipLoss(**config, impl="reference"), *inputs)
    want = loss_and_grads(oc.ClipLoss(**config), *inputs)
    assert got[0].dtype == torch.float64
    assert_matches(got, want)


@pytest.mark.parametrize("n", [1, 7, 97])
@pytest.mark.parametrize("bias", [None, SIGLIP_BIAS])
def test_siglip_loss_matches_open_clip_float64(n, bias):
    inputs = make_inputs(n, bias=bias, scale=SIGLIP_SCALE)
    got = loss_and_grads(SigLipLoss(impl="reference"), *inputs)
    want = loss_and_grads(oc.SigLipLoss(), *inputs)
    assert_matches(got, want)


@BOTH_LOSSES
def test_output_dict(ours, theirs, scale, bias):
    inputs = make_inputs(7, bias=bias, scale=scale)
    got = ours()(*inputs, output_dict=True)
    want = theirs()(*inputs, output_dict=True)
    assert set(got) == set(want) == {"contrastive_loss"}
    torch.testing.assert_close(got["contrastive_loss"], want["contrastive_loss"], rtol=1e-12, atol=0)


def test_cache_labels_has_no_effect_across_batch_sizes():
    ours, theirs = ClipLoss(cache_labels=True), oc.ClipLoss(cache_labels=True)
    for n in (5, 9, 5):
        inputs = make_inputs(n)
        assert_matches(loss_and_grads(ours, *inputs), loss_and_grads(theirs, *inputs))


def _max_errors(got, ref):
    """Largest abs error of the loss and of each gradient against a float64 result."""
    (loss, grads), (ref_loss, ref_grads) = got, ref
    return [(loss.double() - ref_loss).abs().max().item()] + [
        (g.double() - r).abs().max().item() for g, r in zip(grads, ref_grads)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@BOTH_LOSSES
def test_low_precision_is_float32_and_no_worse_than_pytorch(dtype, ours, theirs, scale, bias):
    # The design's relative rule: err(ours vs fp64) <= 2 * err(open_clip in the same dtype vs fp64) + atol.
    inputs = make_inputs(33, dtype=dtype, scale=scale, bias=bias)
    exact = loss_and_grads(theirs(), *as_float64(inputs))
    got = loss_and_grads(ours(impl="reference"), *inputs)
    same_dtype = loss_and_grads(theirs(), *inputs)
    assert got[0].dtype == torch.float32, "the loss accumulates and returns in float32"
    assert [g.dtype for g in got[1][:2]] == [dtype, dtype]
    for ours_err, theirs_err in zip(_max_errors(got, exact), _max_errors(same_dtype, exact)):
        assert ours_err <= 2 * theirs_err + 1e-5


@pytest.mark.triton
@BOTH_LOSSES
def test_triton_impl_matches_open_clip(ours, theirs, scale, bias):
    inputs = make_inputs(7, dtype=torch.float32, scale=scale, bias=bias, d=16)
    exact = loss_and_grads(theirs(), *as_float64(inputs))
    loss, grads = loss_and_grads(ours(impl="triton"), *inputs)
    assert_matches((loss.double(), [g.double() for g in grads]), exact, rtol=1e-4, atol=1e-5)


def test_explicit_impl_does_not_fall_back():
    with pytest.raises(ImplUnavailableError, match="float64"):
        ClipLoss(impl="triton")(*make_inputs(3))


def test_module_is_exported():
    assert vlfast.nn.ClipLoss is ClipLoss and vlfast.nn.SigLipLoss is SigLipLoss


@pytest.mark.parametrize("make, match", [
    (lambda: SigLipLoss(dist_impl="ring"), "dist_impl"),
    (lambda: SigLipLoss(world_size=0), "world_size"),
    (lambda: SigLipLoss(rank=-1, world_size=2), "rank"),
    (lambda: SigLipLoss(rank=2, world_size=2), "rank"),
    (lambda: SigLipLoss(impl="cudnn"), "impl"),
    (lambda: ClipLoss(world_size=0), "world_size"),
    (lambda: ClipLoss(rank=3, world_size=3), "rank"),
    (lambda: ClipLoss(impl="fast"), "impl"),
])
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_non_integer_rank_is_a_type_error():
    with pytest.raises(TypeError, match="world_size"):
        ClipLoss(world_size=2.0)


def test_horovod_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "horovod", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "horovod.torch", None)
    with pytest.raises(ImportError, match="use_horovod=True needs horovod"):
        ClipLoss(use_horovod=True)


@pytest.mark.parametrize("module", [ClipLoss(rank=1, world_size=2), SigLipLoss(rank=1, world_size=2)],
                         ids=["clip", "siglip"])
def test_world_size_without_process_group(module):
    with pytest.raises(RuntimeError, match="init_process_group"):
        module(*make_inputs(3, bias=None), None)


def test_scale_as_python_float():
    image, text, _, _ = make_inputs(5)
    want = oc.ClipLoss()(image, text, torch.tensor(CLIP_SCALE, dtype=torch.float64))
    torch.testing.assert_close(ClipLoss()(image, text, CLIP_SCALE), want, rtol=1e-7, atol=0)
    assert math.isfinite(SigLipLoss()(image, text, SIGLIP_SCALE, SIGLIP_BIAS).item())


@pytest.mark.parametrize("module", [ClipLoss, SigLipLoss])
def test_negative_logit_scale_is_refused_and_zero_is_allowed(module):
    """A negative multiplier would invert the loss (positives pushed apart); zero is a valid limit."""
    a, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    for scale in (-1.0, torch.tensor(-0.25, dtype=torch.float64)):
        with pytest.raises(ValueError, match="logit_scale must be >= 0"):
            module()(a, b, scale, torch.tensor(0.0, dtype=torch.float64))
    if module is ClipLoss:  # all logits equal: each direction's cross-entropy is log N
        torch.testing.assert_close(module()(a, b, 0.0), torch.tensor(math.log(5), dtype=torch.float64))
    else:  # every logit is the bias b: the loss is -(log sigmoid(b) + (N - 1) log sigmoid(-b))
        bias = 0.3
        want = -(math.log(1 / (1 + math.exp(-bias))) + 4 * math.log(1 / (1 + math.exp(bias))))
        torch.testing.assert_close(module()(a, b, 0.0, bias), torch.tensor(want, dtype=torch.float64))
