"""vlfast.models.zero_shot: the CLIP paper's prompt-ensembled classifier."""
import pytest
import torch
import torch.nn.functional as F

from vlfast.models import CLIP, ZeroShotClassifier, zero_shot_weights

WORDS = ["<pad>", "<sot>", "a", "photo", "of", "the", "cat", "dog", "bird", "small", "<eot>"]


def tokenizer(texts):
    """Word ids, right-padded to 8, as transformers' tokenizers return them."""
    ids = torch.zeros(len(texts), 8, dtype=torch.long)
    for row, text in enumerate(texts):
        tokens = [1] + [WORDS.index(w) for w in text.split()] + [len(WORDS) - 1]
        ids[row, :len(tokens)] = torch.tensor(tokens)
    return {"input_ids": ids, "attention_mask": (ids != 0).long()}


TEMPLATES = ["a photo of a {}", lambda c: f"the small {c}"]
CLASSES = ["cat", "dog", "bird"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CLIP.from_preset("test-tiny").double().eval()


def test_classifier_is_the_normalised_mean_of_normalised_prompts(model):
    weights = zero_shot_weights(model, CLASSES, TEMPLATES, tokenizer, batch_size=4)  # batches split classes
    assert weights.shape == (3, 16)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    for k, name in enumerate(CLASSES):
        prompts = [f"a photo of a {name}", f"the small {name}"]
        batch = tokenizer(prompts)
        each = F.normalize(model.encode_text(batch["input_ids"], attention_mask=batch["attention_mask"]), dim=-1)
        torch.testing.assert_close(weights[k], F.normalize(each.mean(0), dim=0), rtol=1e-12, atol=1e-12)
    # A tokenizer that returns the ids alone (open_clip's) gives the same classifier here.
    ids_only = zero_shot_weights(model, CLASSES, TEMPLATES, lambda texts: tokenizer(texts)["input_ids"])
    torch.testing.assert_close(ids_only, weights, rtol=1e-12, atol=1e-12)


def test_predicts_a_planted_class(model):
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    classifier = ZeroShotClassifier.from_prompts(model, CLASSES, TEMPLATES, tokenizer)
    assert classifier.class_names == CLASSES
    logits = classifier(images)
    assert logits.shape == (5, 3)
    features = model.encode_image(images, normalize=True)
    torch.testing.assert_close(logits, model.logit_scale.exp() * features @ classifier.class_weights.t())
    # Plant: a class that image 3 is not predicted as gets image 3's embedding (cosine 1, the maximum).
    target = (int(classifier.predict(images)[3]) + 1) % 3
    planted = classifier.class_weights.clone()
    planted[target] = features[3].detach()
    assert ZeroShotClassifier(model, planted, CLASSES).predict(images)[3] == target


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="class_names is empty"):
        zero_shot_weights(model, [], TEMPLATES, tokenizer)
    with pytest.raises(ValueError, match="templates is empty"):
        zero_shot_weights(model, CLASSES, [], tokenizer)
    with pytest.raises(TypeError, match="return_tensors='pt'"):
        zero_shot_weights(model, CLASSES, TEMPLATES, lambda texts: {"input_ids": [[1, 2]] * len(texts)})
    with pytest.raises(TypeError, match="without 'input_ids'"):
        zero_shot_weights(model, CLASSES, TEMPLATES, lambda texts: {"ids": None})
    with pytest.raises(ValueError, match=r"class_weights must be \(classes, embed_dim=16\)"):
        ZeroShotClassifier(model, torch.zeros(3, 8))
    with pytest.raises(ValueError, match="2 class_names for 3 class_weights rows"):
        ZeroShotClassifier(model, torch.zeros(3, 16), ["a", "b"])
