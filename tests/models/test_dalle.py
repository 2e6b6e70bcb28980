"""vlfast.models.DALLE: the sparse-layer cycle, the loss against explicit float64 logits, the blocks against
dense masked attention, KV-cache sampling against full recomputation, guidance, re-ranking, bad input."""
import pytest
import torch
import torch.nn.functional as F

from vlfast.generation import sample
from vlfast.models import CLIP
from vlfast.models.dalle import DALLE, DALLEConfig, layer_kinds, rerank

CONFIG = DALLEConfig(text_vocab=30, text_len=6, image_vocab=20, grid=3, dim=32, layers=4, heads=4, conv_kernel=3)


def _model(seed=0):
    torch.manual_seed(seed)
    return DALLE(CONFIG).double().eval()


def _batch(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30, (b, 4), generator=g), torch.randint(0, 20, (b, 9), generator=g)


def test_the_papers_layer_cycle():
    assert layer_kinds(8) == ["row", "column", "row", "row", "row", "column", "row", "conv"]
    assert [m.dalle[3] for m in _model().masks] == [1, 2, 1, 3]  # row, column, row, conv codes


def test_text_padding_tokens_are_per_position():
    model = _model()
    text = model.pad_text(torch.tensor([[3, 4, 5], [7, 8, 9]]), lengths=torch.tensor([3, 1]))
    assert text.tolist() == [[3, 4, 5, 33, 34, 35], [7, 30 + 1, 30 + 2, 33, 34, 35]]


def test_blocks_equal_dense_masked_attention():
    """Each layer's sparse mask is the one the blocks apply: a manual forward with SDPA and the layer's
    dense mask gives the same hidden states (float64)."""
    model = _model()
    text, image = _batch()
    x = model.embed(model.pad_text(text), image)
    want = x
    for block, mask in zip(model.blocks, model.masks):
        h = block.ln_1(want)
        q, k, v = block.attn.qkv(h).chunk(3, dim=-1)
        q, k, v = (t.view(2, 15, 4, 8).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to_dense(15, 15)[:, None])
        want = want + block.attn.out(a.transpose(1, 2).reshape(2, 15, 32))
        want = want + block.mlp(block.ln_2(want))
    torch.testing.assert_close(model.hidden_states(x), model.ln_f(want), rtol=1e-10, atol=1e-12)


def test_loss_equals_explicit_float64_logits():
    model = _model()
    text, image = _batch()
    text = model.pad_text(text)
    h = model.hidden_states(model.embed(text, image))
    text_logits = h[:, :5] @ model.text_head.weight.T
    image_logits = h[:, 5:-1] @ model.image_head.weight.T
    want = (F.cross_entropy(text_logits.reshape(-1, 36), text[:, 1:].reshape(-1)) / 8
            + 7 * F.cross_entropy(image_logits.reshape(-1, 20), image.reshape(-1)) / 8)
    got = model.loss(text, image)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.equal(model(text, image), got)  # forward is the loss (what DDP calls)
    got.backward()
    assert model.text_embed.weight.grad is not None and model.row_embed.grad is not None


def _recompute(model, text, temperature, generator):
    """Sampling without a cache: the whole sequence again for every image token."""
    image = torch.zeros(text.shape[0], 0, dtype=torch.long)
    for _ in range(9):
        h = model.hidden_states(model.embed(text, image))
        logits = model.image_head(h[:, -1])
        image = torch.cat([image, sample(logits, temperature, generator=generator)[:, None]], dim=1)
    return image


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kv_cache_sampling_equals_full_recompute(temperature):
    model = _model()
    text = model.pad_text(_batch()[0])
    got = model.generate(text, temperature=temperature, generator=torch.Generator().manual_seed(5))
    want = _recompute(model, text, temperature, torch.Generator().manual_seed(5))
    assert torch.equal(got, want)


def test_guidance_at_scale_one_is_unguided_and_images_repeat_per_caption():
    model = _model()
    text = model.pad_text(_batch()[0])
    plain = model.generate(text, num_images=2, temperature=0.0)
    guided = model.generate(text, num_images=2, temperature=0.0, cond_scale=1.0)
    assert plain.shape == (4, 9) and torch.equal(plain, guided)
    assert torch.equal(plain[0], plain[1]) and torch.equal(plain[2], plain[3])  # greedy: the same per caption


def test_rerank_picks_each_captions_best_image():
    torch.manual_seed(0)
    clip = CLIP.from_preset("test-tiny").eval()
    images = torch.randn(6, 3, 32, 32)
    captions = torch.randint(1, 98, (2, 8))
    captions[:, -1] = 98
    best, scores = rerank(images, captions, clip, num_images=3)
    img = F.normalize(clip.encode_image(images), dim=-1).view(2, 3, -1)
    txt = F.normalize(clip.encode_text(captions), dim=-1)
    torch.testing.assert_close(scores, torch.einsum("bkd,bd->bk", img, txt))
    assert torch.equal(best, scores.argmax(1))


def test_bad_input_is_named():
    model = _model()
    with pytest.raises(ValueError, match="S <= text_len=6"):
        model.pad_text(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"text ids must lie in \[0, text_vocab=30\)"):
        model.pad_text(torch.tensor([[30]]))
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, image_vocab=20\)"):
        model.loss(model.pad_text(torch.tensor([[1]])), torch.full((1, 9), 20))
    with pytest.raises(ValueError, match="dim \\(30\\) must be a multiple of heads"):
        DALLEConfig(dim=30, heads=4)
    with pytest.raises(ValueError, match="DALLEConfig.grid must be a positive int, got 0"):
        DALLEConfig(grid=0)
