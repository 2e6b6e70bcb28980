"""attn_implementation="vlfast": tiny random CLIP, SigLIP, LLaMA and LLaVA models built locally, whose
outputs and gradients must match transformers' own attention ("sdpa" in float64: the same math;
"eager" in float32: within tolerance)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlamaForCausalLM,  # noqa: E402
                          LlavaConfig, LlavaForConditionalGeneration, SiglipConfig, SiglipModel)

import vlfast.integrations.transformers.attention as hf_attention  # noqa: E402
from vlfast.integrations.transformers import register  # noqa: E402

VOCAB = 99


@pytest.fixture(autouse=True)
def _registered():
    register()
    yield
    hf_attention._IMPL["impl"] = "auto"


def _set_impl(model, name):
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            config._attn_implementation = name
    model.config._attn_implementation = name


def _text(**kw):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, **kw)


def _vision():
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                patch_size=8)


def _llama():
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


def _clip():
    return CLIPModel(CLIPConfig(text_config=_text(), vision_config=_vision(), projection_dim=16))


def _siglip():
    return SiglipModel(SiglipConfig(text_config=_text(), vision_config=_vision()))


def _llava():
    text = LlamaConfig(vocab_size=VOCAB + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB,
                                                     vision_feature_select_strategy="default",
                                                     vision_feature_layer=-1))


def _inputs(kind, dtype):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    if kind == "llama":
        return {"input_ids": ids, "attention_mask": mask}
    if kind == "llava":
        ids[:, 1:5] = VOCAB  # 2 x 2 patches per image
        return {"input_ids": ids, "pixel_values": torch.randn(3, 3, 16, 16, generator=g, dtype=dtype)}
    pixels = torch.randn(3, 3, 32, 32, generator=g, dtype=dtype)
    if kind == "siglip":  # SigLIP pads to a fixed length and attends to every text token
        return {"input_ids": ids, "pixel_values": pixels}
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def _outputs(out, kind):
    if kind in ("llama", "llava"):
        return [out.logits]
    return [out.logits_per_image, out.text_embeds, out.image_embeds]


def _run(model, kind, dtype, name):
    _set_impl(model, name)
    model.zero_grad(set_to_none=True)
    outs = _outputs(model(**_inputs(kind, dtype)), kind)
    sum(o.square().sum() for o in outs).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


MODELS = {"llama": _llama, "clip": _clip, "siglip": _siglip, "llava": _llava}


@pytest.mark.parametrize("kind", MODELS)
def test_float64_matches_sdpa(kind):
    torch.manual_seed(0)
    model = MODELS[kind]().double()
    want, want_grads = _run(model, kind, torch.float64, "sdpa")
    got, got_grads = _run(model, kind, torch.float64, "vlfast")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("kind", ["llama", "clip"])
def test_float32_matches_eager(kind, impl):
    torch.manual_seed(0)
    model = MODELS[kind]()
    register(impl=impl)
    want, want_grads = _run(model, kind, torch.float32, "eager")
    got, got_grads = _run(model, kind, torch.float32, "vlfast")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_packed_sequences_use_the_varlen_path():
    """transformers' packed-batch kwargs (cu_seq_lens_*) reach attention_varlen."""
    q, k, v = (torch.randn(1, 4, 12, 8, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = hf_attention.attention_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                            max_length_q=7, max_length_k=7)
    for a, b in ((0, 5), (5, 12)):
        want = torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                is_causal=True)
        torch.testing.assert_close(out[0, a:b], want[0].transpose(0, 1))


def test_unsupported_requests_get_clear_errors():
    q = torch.randn(1, 2, 4, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="padding mask"):
        hf_attention.attention_forward(module, q, q, q, torch.ones(1, 1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention dropout"):
        hf_attention.attention_forward(module, q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="softcap"):
        hf_attention.attention_forward(module, q, q, q, None, softcap=30.0)


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_generate_uses_the_decode_kernel_and_matches_sdpa(impl, monkeypatch):
    """generate() of a LLaMA with left-padded prompts of different lengths: greedy tokens equal sdpa's,
    and the steps after the prompt go through vlfast.attention_decode."""
    torch.manual_seed(0)
    model = _llama().eval()
    register(impl=impl)
    ids = torch.randint(3, VOCAB, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0  # left padding, as generate() wants it
    mask[2, :6] = 0
    calls = []
    real = hf_attention.attention_decode
    monkeypatch.setattr(hf_attention, "attention_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = {}
    for name in ("sdpa", "vlfast"):
        _set_impl(model, name)
        out[name] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["vlfast"], out["sdpa"])
    assert len(calls) == 5 * 2  # 5 steps after the prompt's, 2 layers each
