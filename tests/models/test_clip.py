"""vlfast.models.CLIP against transformers' CLIPModel (tiny, random, float64), and its own contract."""
import math
from dataclasses import replace

import pytest
import torch

from vlfast.loaders import clip_from_transformers, convert_state_dict
from vlfast.models import CLIP, PRESETS, CLIPConfig, TextConfig, VisionConfig
from vlfast.models.clip import eos_positions
from vlfast.nn import ClipLoss

from .common import CONTEXT, LARGEST, hf_model, hf_outputs, pixels, text_batch, vlfast_outputs


TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _pair(**config):
    hf = hf_model(**config)
    return hf, clip_from_transformers(hf.state_dict(), hf.config, dtype=torch.float64).eval()


def _assert_all_close(got, want, **tol):
    for name, g, w in zip(("image embeddings", "text embeddings", "logits"), got, want):
        torch.testing.assert_close(g, w, **tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_matches_transformers_with_padding(act):
    """Pooling at the largest id (OpenAI), right padding through attention_mask."""
    hf, ours = _pair(act=act)
    images, (ids, mask) = pixels(4), text_batch()
    with torch.no_grad():
        _assert_all_close(vlfast_outputs(ours, images, ids, mask), hf_outputs(hf, images, ids, mask), **TIGHT)
    assert ours.config.text.eos_token_id is None and ours.config.vision.act == act


def test_pools_at_eos_token_id_when_configured():
    """transformers' newer convention: the first eos_token_id, here also the padding id and not the largest."""
    hf, ours = _pair(eos_token_id=40)
    assert ours.config.text.eos_token_id == 40
    images, (ids, mask) = pixels(4), text_batch(eos=40, pad=40)
    assert (ids.argmax(-1) != (ids == 40).int().argmax(-1)).any()  # the conventions disagree on this batch
    with torch.no_grad():
        _assert_all_close(vlfast_outputs(ours, images, ids, mask), hf_outputs(hf, images, ids, mask), **TIGHT)
        # The same weights pooling at the largest id give other text embeddings.
        config = ours.config
        argmax = CLIP(replace(config, text=replace(config.text, eos_token_id=None))).double()
        argmax.load_state_dict(ours.state_dict())
        assert not torch.allclose(argmax.encode_text(ids, attention_mask=mask),
                                  ours.encode_text(ids, attention_mask=mask))


def test_eos_positions_conventions_and_missing_eos():
    ids = torch.tensor([[1, 7, 9, 3, 0], [1, 3, 3, 9, 9]])
    assert eos_positions(ids, None).tolist() == [2, 3]
    assert eos_positions(ids, 3).tolist() == [3, 1]
    with pytest.raises(ValueError, match=r"rows \[0\] contain no eos_token_id=7"):
        eos_positions(torch.tensor([[1, 2, 3], [7, 7, 7]]), 7)


def test_padding_mask_keeps_padded_tokens_out():
    """Left padding, so that real tokens come after padded ones: with the mask, the padded ids do not
    matter; without it they do. Padded queries (nothing to attend to) give finite outputs."""
    _, ours = _pair()
    ids, mask = text_batch()
    lengths = mask.sum(1)
    left = torch.stack([row.roll(int(ids.shape[1] - n)) for row, n in zip(ids, lengths)])
    left_mask = torch.stack([row.roll(int(ids.shape[1] - n)) for row, n in zip(mask, lengths)])
    other = left.masked_fill(left_mask == 0, 77)
    with torch.no_grad():
        want = ours.encode_text(left, attention_mask=left_mask)
        torch.testing.assert_close(ours.encode_text(other, attention_mask=left_mask), want, **TIGHT)
        assert not torch.allclose(ours.encode_text(other), ours.encode_text(left))
        assert torch.isfinite(want).all()


def test_loss_and_parameter_gradients_match_transformers():
    """vlfast.nn.ClipLoss on vlfast's CLIP vs transformers' CLIPModel(return_loss=True), float64."""
    hf, ours = _pair()
    images, (ids, mask) = pixels(4), text_batch()
    want = hf(input_ids=ids, pixel_values=images, attention_mask=mask, return_loss=True).loss
    want.backward()
    got = ClipLoss(impl="reference")(*ours(images, ids, mask))
    got.backward()
    torch.testing.assert_close(got, want, **TIGHT)
    hf_grads = {k: p.grad for k, p in hf.named_parameters()}
    want_grads = convert_state_dict(hf_grads, ours.config, "transformers")
    got_grads = {k: p.grad for k, p in ours.named_parameters()}
    assert got_grads.keys() == want_grads.keys()
    for k, g in got_grads.items():
        assert g.abs().max() > 0, k
        torch.testing.assert_close(g, want_grads[k], rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")


def _err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def test_bf16_autocast_error_within_twice_transformers():
    """Under torch.autocast(bfloat16) on a CPU, vlfast's error against float64 is at most twice
    transformers' (float32 weights, bf16 compute) plus a small tolerance."""
    hf64, ours64 = _pair()
    hf32, ours32 = hf64.float(), clip_from_transformers(hf64.state_dict(), hf64.config).eval()
    images, (ids, mask) = pixels(4), text_batch()
    with torch.no_grad():
        ref = hf_outputs(hf64, images, ids, mask)
        fp32 = vlfast_outputs(ours32, images.float(), ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = vlfast_outputs(ours32, images.float(), ids, mask)
            peer = hf_outputs(hf32, images.float(), ids, mask)
    for name, g, p, f, r in zip(("image", "text", "logits"), got, peer, fp32, ref):
        assert _err(f, r) < 1e-5, name
        assert 0 < _err(g, r) <= 2 * _err(p, r) + 1e-3, (name, _err(g, r), _err(p, r))


def test_forward_returns_open_clip_outputs():
    model = CLIP(CLIPConfig.preset("test-tiny"))
    images, (ids, mask) = pixels(2, torch.float32), text_batch((5, 3))
    image, text, scale = model(images, ids)
    assert image.shape == text.shape == (2, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(scale, torch.tensor(1 / 0.07))
    out = model(image=images, output_dict=True)
    assert out["text_features"] is None and set(out) == {"image_features", "text_features", "logit_scale"}
    torch.testing.assert_close(out["image_features"], image)
    assert model(text=ids, attention_mask=mask)[0] is None
    torch.testing.assert_close(model.encode_image(images, normalize=True), image)
    assert not torch.allclose(model.encode_text(ids).norm(dim=-1), torch.ones(2))
    loss = ClipLoss()(*model(images, ids, mask))
    loss.backward()
    assert torch.isfinite(loss) and model.logit_scale.grad is not None


# Parameter counts of OpenAI's released models.
OPENAI_PARAMS = {"ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513,
                 "ViT-L/14-336": 427_944_193}


@pytest.mark.parametrize("name", list(OPENAI_PARAMS))
def test_presets_have_openai_sizes(name):
    with torch.device("meta"):
        model = CLIP.from_preset(name)
    assert sum(p.numel() for p in model.parameters()) == OPENAI_PARAMS[name]
    assert set(PRESETS) >= set(OPENAI_PARAMS) | {"test-tiny", "test-small"}


def test_bad_configs_and_inputs_are_named():
    with pytest.raises(ValueError, match="unknown CLIP preset 'ViT-H'.*ViT-B/32"):
        CLIPConfig.preset("ViT-H")
    with pytest.raises(ValueError, match=r"VisionConfig.width \(30\) must be a multiple of VisionConfig.heads \(4\)"):
        VisionConfig(width=30, heads=4)
    with pytest.raises(ValueError, match="image_size .* multiple of patch_size"):
        VisionConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="TextConfig.act must be one of"):
        TextConfig(act="relu")
    with pytest.raises(ValueError, match="TextConfig.layers must be a positive int"):
        TextConfig(layers=0)
    with pytest.raises(ValueError, match="eos_token_id must be None or an int in"):
        TextConfig(vocab_size=10, eos_token_id=10)
    model = CLIP.from_preset("test-tiny")
    ids, mask = text_batch((5, 3))
    with pytest.raises(ValueError, match=r"image must be \(B, 3, 32, 32\), got \(2, 3, 16, 16\)"):
        model.encode_image(torch.randn(2, 3, 16, 16))
    with pytest.raises(TypeError, match="text must be an int64 / int32 tensor"):
        model.encode_text(ids.float())
    with pytest.raises(ValueError, match=f"S <= context_length={CONTEXT}"):
        model.encode_text(torch.ones(2, CONTEXT + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have the shape of text"):
        model.encode_text(ids, attention_mask=mask[:, :3])
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        model.encode_text(ids, attention_mask=mask.float())
    with pytest.raises(TypeError, match="config must be a CLIPConfig"):
        CLIP({"embed_dim": 16})
    assert LARGEST == PRESETS["test-tiny"].text.vocab_size - 1
    assert math.isclose(CLIP.from_preset("test-tiny").logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


@pytest.mark.parametrize("bad_id", [-1, 99, 1000])
def test_token_ids_outside_the_vocabulary_are_named(bad_id):
    model = CLIP(CLIPConfig.preset("test-tiny"))  # vocab_size 99
    ids = torch.randint(0, 99, (2, 6))
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"input_ids.*\[0, vocab_size=99\).*{bad_id}"):
        model.encode_text(ids)


def test_padded_text_is_packed_once_for_the_whole_tower():
    """With a padding mask every block runs on the real tokens only, (T, W), and the output is the
    one the padded layout gives (transformers parity above)."""
    _, ours = _pair()
    ids, mask = text_batch()
    seen = []
    hooks = [block.register_forward_pre_hook(lambda _, args: seen.append(tuple(args[0].shape)))
             for block in ours.text.blocks]
    try:
        with torch.no_grad():
            ours.encode_text(ids, attention_mask=mask)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [(int(mask.sum()), ours.config.text.width)] * len(ours.text.blocks)


def test_pooling_at_a_padded_position_is_named():
    _, ours = _pair()
    ids, mask = text_batch()
    mask[1, 4] = 0  # row 1's end-of-text token (its largest id) is at position 4
    with pytest.raises(ValueError, match=r"attention_mask: rows \[1\] are pooled at a padded position"):
        ours.encode_text(ids, attention_mask=mask)


def test_text_tower_with_padding_compiles():
    """The text tower with a padding mask under torch.compile gives eager's features and gradients."""
    torch._dynamo.reset()
    _, ours = _pair()
    ids, mask = text_batch()
    want = ours.encode_text(ids, attention_mask=mask)
    got = torch.compile(ours.encode_text, backend="aot_eager")(ids, attention_mask=mask)
    torch.testing.assert_close(got, want, **TIGHT)
    params = [p for p in ours.text.parameters()]
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, **TIGHT)
