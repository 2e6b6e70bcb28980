"""vlfast.integrations.transformers: a causal LM's loss (LLaMA, LLaVA) without logits, on tiny random
models built locally, against the model's own loss and gradients."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig,  # noqa: E402
                          LlavaForConditionalGeneration)

from vlfast.integrations.transformers import causal_lm_loss, patch  # noqa: E402
from vlfast.nn import LinearCrossEntropy  # noqa: E402

VOCAB = 120
IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.triton)]


def _text_config(**kw):
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)


def _llama(**kw):
    torch.manual_seed(0)
    return LlamaForCausalLM(_text_config(**kw)).double()


def _batch(b=3, t=11):
    ids = torch.randint(0, VOCAB - 1, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -3:] = 0  # right padding on one sequence
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, :4] = -100  # a prompt whose tokens are not trained on
    return ids, mask, labels


def _loss64(logits, labels):
    """The causal-LM loss from float64 logits (transformers' own loss upcasts to float32 only)."""
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(got_loss, got_grads, want_loss, want_grads):
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-10, atol=1e-12)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-8, atol=1e-12, msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_loss_and_gradients_match_the_model(tied):
    """float64 (the reference path; the Triton path is checked in float32 below)."""
    model = _llama(tie_word_embeddings=tied)
    ids, mask, labels = _batch()
    want = _loss64(model(input_ids=ids, attention_mask=mask).logits, labels)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got, _ = causal_lm_loss(model, labels, input_ids=ids, attention_mask=mask)
    got.backward()
    _assert_same(got, _grads(model), want, want_grads)


@pytest.mark.parametrize("impl", IMPLS)
def test_patched_forward_in_float32_with_gradient_accumulation_count(impl):
    torch.manual_seed(0)
    model = LlamaForCausalLM(_text_config())
    ids, mask, labels = _batch()
    n_items = torch.tensor(25)
    want = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
    want.loss.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    patch(model, impl=impl)
    got = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
    assert got.logits is None
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(_grads(model)[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # without labels the original forward runs: logits for generation
    assert model(input_ids=ids).logits.shape == (3, 11, VOCAB)


def test_llava_loss_matches_the_model():
    """LLaVA: CLIP vision tower + projector + LLaMA; image tokens carry no labels."""
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    config = LlavaConfig(vision_config=vision, text_config=_text_config(), image_token_id=VOCAB - 1,
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).double()
    ids = torch.randint(0, VOCAB - 1, (2, 12))
    ids[:, 1:5] = VOCAB - 1  # 2 x 2 patches per image
    pixels = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    labels = ids.masked_fill(ids == VOCAB - 1, -100)
    want = _loss64(model(input_ids=ids, pixel_values=pixels).logits, labels)
    want.backward()
    want_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    patch(model)
    got = model(input_ids=ids, pixel_values=pixels, labels=labels)
    got.loss.backward()
    _assert_same(got.loss, _grads(model), want, want_grads)


def test_linear_cross_entropy_module_shares_the_head():
    model = _llama()
    module = LinearCrossEntropy.from_linear(model.lm_head)
    assert module.weight is model.lm_head.weight
    hidden = torch.randn(2, 5, 32, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (2, 5))
    want = torch.nn.functional.cross_entropy(module.logits(hidden).reshape(-1, VOCAB), targets.reshape(-1))
    torch.testing.assert_close(module(hidden, targets), want)
    with pytest.raises(ValueError, match="targets' shape"):
        module(hidden, targets[:, :4])
    with pytest.raises(TypeError, match="unknown options"):
        LinearCrossEntropy.from_linear(model.lm_head, temperature=2.0)


def test_bad_labels_and_models_get_clear_errors():
    model = _llama()
    ids, mask, labels = _batch()
    with pytest.raises(ValueError, match="do not match the model's hidden states"):
        causal_lm_loss(model, labels[:, :5], input_ids=ids)
    with pytest.raises(TypeError, match="no base model and linear output head"):
        causal_lm_loss(torch.nn.Linear(3, 3), labels, input_ids=ids)
