"""Tiny random transformers CLIPModels built locally (no download), their inputs, and the OpenAI
layout of their weights written out by hand (independently of vlfast.loaders' key maps)."""
import pytest
import torch

VOCAB, CONTEXT = 99, 16
LARGEST = VOCAB - 1  # the end-of-text id under OpenAI's argmax convention
LAYERS = 2
SKIP_REASON = "parity tests build transformers' CLIPModel: pip install transformers"


def hf_config(*, eos_token_id=2, act="quick_gelu", attn="sdpa"):
    """transformers CLIPConfig: hidden 32, 2 layers, 4 heads, image 32, patch 8, vocab 99.

    eos_token_id=2 is transformers' legacy marker for pooling at the largest id. attn="sdpa": its eager
    attention takes the softmax in float32, SDPA keeps float64.
    """
    transformers = pytest.importorskip("transformers", reason=SKIP_REASON)
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
             "hidden_act": act}
    return transformers.CLIPConfig(
        text_config={**tower, "vocab_size": VOCAB, "max_position_embeddings": CONTEXT, "bos_token_id": 1,
                     "pad_token_id": 0, "eos_token_id": eos_token_id},
        vision_config={**tower, "image_size": 32, "patch_size": 8}, projection_dim=16, attn_implementation=attn)


def hf_model(seed=0, dtype=torch.float64, **config):
    transformers = pytest.importorskip("transformers", reason=SKIP_REASON)
    torch.manual_seed(seed)
    model = transformers.CLIPModel(hf_config(**config)).to(dtype).eval()
    with torch.no_grad():  # transformers starts some of these at exactly 0 / 1: make every weight count
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def pixels(b=3, dtype=torch.float64):
    return torch.randn(b, 3, 32, 32, dtype=dtype)


def text_batch(lengths=(12, 5, 16, 9), *, eos=LARGEST, pad=0):
    """Right-padded ids (B, max length) and their attention mask; each sequence ends with `eos`.

    Other tokens avoid eos and pad but include ids above eos when eos is not the largest, so pooling
    at the largest id and at the first eos differ.
    """
    s = max(lengths)
    ids = torch.randint(2, VOCAB, (len(lengths), s))
    ids[ids == eos] = 3
    mask = torch.zeros(len(lengths), s, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, n - 1], mask[row, :n] = eos, 1
        ids[row, n:] = pad
    return ids, mask


def openai_layout(hf_state: dict) -> dict:
    """transformers' CLIPModel weights under OpenAI's keys: q, k, v concatenated into in_proj, the two
    projections stored (in, out)."""
    sd = hf_state
    out = {
        "logit_scale": sd["logit_scale"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t(),
    }
    norms = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm",
             "ln_final": "text_model.final_layer_norm"}
    for ours, theirs in norms.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd[f"{theirs}.{p}"]
    for oa, hf in (("visual.transformer.resblocks", "vision_model.encoder.layers"),
                   ("transformer.resblocks", "text_model.encoder.layers")):
        for i in range(LAYERS):
            a, h = f"{oa}.{i}", f"{hf}.{i}"
            out[f"{a}.attn.in_proj_weight"] = torch.cat([sd[f"{h}.self_attn.{x}_proj.weight"] for x in "qkv"])
            out[f"{a}.attn.in_proj_bias"] = torch.cat([sd[f"{h}.self_attn.{x}_proj.bias"] for x in "qkv"])
            for p in ("weight", "bias"):
                out[f"{a}.attn.out_proj.{p}"] = sd[f"{h}.self_attn.out_proj.{p}"]
                out[f"{a}.ln_1.{p}"] = sd[f"{h}.layer_norm1.{p}"]
                out[f"{a}.ln_2.{p}"] = sd[f"{h}.layer_norm2.{p}"]
                out[f"{a}.mlp.c_fc.{p}"] = sd[f"{h}.mlp.fc1.{p}"]
                out[f"{a}.mlp.c_proj.{p}"] = sd[f"{h}.mlp.fc2.{p}"]
    return {k: v.clone() for k, v in out.items()}


def hf_outputs(model, images, ids, mask=None):
    """(image embeddings, text embeddings, logits_per_image) from transformers, unit-norm embeddings."""
    out = model(input_ids=ids, pixel_values=images, attention_mask=mask)
    return out.image_embeds, out.text_embeds, out.logits_per_image


def vlfast_outputs(model, images, ids, mask=None):
    image, text, scale = model(images, ids, mask)
    return image, text, scale * image @ text.t()
