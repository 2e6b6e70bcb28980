"""vlfast.retrieval against dense float64 rankings written here."""
import pytest
import torch
import torch.nn.functional as F

from vlfast.retrieval import recall_at_k, zero_shot_topk


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
