"""vlfast.retrieval against dense float64 rankings written here."""
import pytest
import torch
import torch.nn.functional as F

from vlfast.models import CLIP, CLIPConfig, TextConfig, VisionConfig
from vlfast.retrieval import arithmetic_query, embedding_arithmetic, recall_at_k, zero_shot_topk


def _dense_recall(img, txt, owner, k):
    s = F.normalize(txt.double(), dim=1) @ F.normalize(img.double(), dim=1).T  # (Nt, Ni)
    top_img = torch.sort(-s, dim=1, stable=True).indices[:, :k]
    t2i = (top_img == owner[:, None]).any(1).double().mean().item()
    top_txt = torch.sort(-s.T, dim=1, stable=True).indices[:, :k]
    i2t = (owner[top_txt] == torch.arange(img.shape[0])[:, None]).any(1).double().mean().item()
    return t2i, i2t


def test_recall_matches_a_dense_computation_with_several_captions_per_image():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(40, 16, generator=g)
    owner = torch.arange(40).repeat_interleave(3)[torch.randperm(120, generator=g)]
    txt = img[owner] + 1.5 * torch.randn(120, 16, generator=g)  # noisy captions of their images
    got = recall_at_k(img, txt, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        t2i, i2t = _dense_recall(img, txt, owner, k)
        assert got[f"text_to_image@{k}"] == pytest.approx(t2i) and got[f"image_to_text@{k}"] == pytest.approx(i2t)
    assert 0 < got["text_to_image@1"] < got["text_to_image@10"] <= 1


def test_zero_shot_over_many_classes_is_the_dense_argmax():
    g = torch.Generator().manual_seed(1)
    img, classes = torch.randn(50, 32, generator=g), torch.randn(3001, 32, generator=g)
    index, score = zero_shot_topk(img, classes, k=3)
    s = F.normalize(img.double(), dim=1) @ F.normalize(classes.double(), dim=1).T
    assert torch.equal(index[:, 0], s.argmax(1))
    torch.testing.assert_close(score.double(), s.gather(1, index), rtol=1e-6, atol=1e-7)


def test_bad_input_is_named():
    img, txt = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="text_to_image must be"):
        recall_at_k(img, txt, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="must index the 4 images"):
        recall_at_k(img, txt, torch.full((6,), 4))
    with pytest.raises(ValueError, match="ks must be positive"):
        recall_at_k(img, txt, torch.zeros(6, dtype=torch.long), ks=(0,))


def _unit64(x):
    return x.double() / x.double().norm(dim=1, keepdim=True)


def test_arithmetic_query_is_the_normalised_sum_of_normalised_terms():
    g = torch.Generator().manual_seed(2)
    img, minus, plus = (torch.randn(5, 12, generator=g) * s for s in (3.0, 0.5, 7.0))
    got = arithmetic_query(img.double(), minus.double(), plus[:1].double())  # (1, D) broadcasts
    want = _unit64(_unit64(img) - _unit64(minus) + _unit64(plus[:1]))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert arithmetic_query(img, minus, plus).dtype == torch.float32


def test_embedding_arithmetic_ranks_the_gallery_like_a_dense_float64_search():
    torch.manual_seed(3)
    tower = dict(width=16, layers=1, heads=2, mlp_dim=32)
    model = CLIP(CLIPConfig(embed_dim=8, vision=VisionConfig(image_size=16, patch_size=8, **tower),
                            text=TextConfig(vocab_size=20, context_length=6, **tower))).double().eval()
    images, gallery_images = torch.randn(3, 3, 16, 16, dtype=torch.float64), torch.randn(37, 3, 16, 16, dtype=torch.float64)
    minus = torch.tensor([[1, 4, 19, 0, 0, 0]])  # one text for every image, padded
    plus = torch.tensor([[1, 7, 9, 19, 0, 0], [1, 5, 19, 0, 0, 0], [1, 8, 8, 8, 19, 0]])
    mask_m, mask_p = (minus > 0).long(), (plus > 0).long()
    with torch.no_grad():
        gallery = model.encode_image(gallery_images)
        query = _unit64(_unit64(model.encode_image(images)) - _unit64(model.encode_text(minus, attention_mask=mask_m))
                        + _unit64(model.encode_text(plus, attention_mask=mask_p)))
    index, score = embedding_arithmetic(model, images, minus, plus, gallery, k=5, minus_mask=mask_m, plus_mask=mask_p)
    dense = query @ _unit64(gallery).T
    assert torch.equal(index, torch.sort(-dense, dim=1, stable=True).indices[:, :5])
    torch.testing.assert_close(score.double(), dense.gather(1, index), rtol=1e-6, atol=1e-7)  # scores are float32


def test_arithmetic_bad_input_is_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="share one width"):
        arithmetic_query(x, x, torch.randn(2, 9))
    with pytest.raises(ValueError, match="minus_embeds holds non-finite"):
        arithmetic_query(x, torch.full((2, 8), float("nan")), x)
    with pytest.raises(ValueError, match="image_embeds must be a floating"):
        arithmetic_query(torch.ones(2, 8, dtype=torch.long), x, x)
