"""LLaVA checkpoints: transformers' LlavaForConditionalGeneration <-> vlfast.models.LLaVA.

transformers has stored LLaVA under three key layouts; the one at hand is found from the keys:
    "v5"   model.vision_tower.*               model.multi_modal_projector.*  model.language_model.*  lm_head.weight
    "v4.5" model.vision_tower.vision_model.*  model.multi_modal_projector.*  model.language_model.*  lm_head.weight
    "old"  vision_tower.vision_model.*        multi_modal_projector.*        language_model.model.*
           language_model.lm_head.weight
The parts' maps are the CLIP vision tower's (loaders/clip.py) and LLaMA's (loaders/llama.py).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.llava import LLaVA, LlavaConfig
from . import llama
from .checkpoint import Source, convert, export, model_config, read_state_dict
from .clip import vision_config_from_transformers, vision_key_map, vision_transformers_config

# layout -> (vision transformer prefix, projector prefix, LLaMA decoder prefix, LM head key)
LAYOUTS = {
    "v5": ("model.vision_tower.", "model.multi_modal_projector.", "model.language_model.", "lm_head.weight"),
    "v4.5": ("model.vision_tower.vision_model.", "model.multi_modal_projector.", "model.language_model.",
             "lm_head.weight"),
    "old": ("vision_tower.vision_model.", "multi_modal_projector.", "language_model.model.",
            "language_model.lm_head.weight"),
}


def layout_of(state_dict: Mapping) -> str:
    """The key layout of a LLaVA checkpoint (its vision tower's class embedding names it)."""
    for layout, (vision, *_) in LAYOUTS.items():
        if vision + "embeddings.class_embedding" in state_dict:
            return layout
    return "v5"  # a checkpoint without it fails the key check with the v5 names listed


def key_map(config: LlavaConfig, layout: str = "v5") -> dict:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    vision, projector, decoder, head = LAYOUTS[layout]
    out = {f"vision_tower.{k}": v for k, v in vision_key_map(config.vision, vision).items()}
    for linear in ("linear_1", "linear_2"):
        for kind in ("weight", "bias") if config.projector_bias else ("weight",):
            out[f"projector.{linear}.{kind}"] = f"{projector}{linear}.{kind}"
    out.update({f"language_model.{k}": v for k, v in llama.key_map(config.text, decoder, head).items()})
    return out


def _shapes(config: LlavaConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in LLaVA(config).state_dict().items()}


def config_from_transformers(hf_config, image_attention: str = "causal") -> LlavaConfig:
    """A vlfast LlavaConfig from a transformers LlavaConfig or its config.json dict."""
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    act = d.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"the projector's activation must be 'gelu' (LLaVA-1.5's mlp2x_gelu), got {act!r}")
    vision = d.get("vision_config") or {}
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"the vision tower must be a CLIP vision model, got {vision.get('model_type')!r}")
    layer = d.get("vision_feature_layer", -2)
    return LlavaConfig(vision=vision_config_from_transformers(vision),
                       text=llama.config_from_transformers(d.get("text_config") or {}),
                       image_token_index=d.get("image_token_index", d.get("image_token_id", 32000)),
                       vision_feature_layer=tuple(layer) if isinstance(layer, (list, tuple)) else layer,
                       vision_feature_select_strategy=d.get("vision_feature_select_strategy", "default"),
                       projector_bias=bool(d.get("multimodal_projector_bias", True)), image_attention=image_attention)


def transformers_config(config: LlavaConfig) -> dict:
    """transformers.LlavaConfig(**this) describes the same model."""
    layer = config.vision_feature_layer
    return {"vision_config": {"model_type": "clip_vision_model", **vision_transformers_config(config.vision)},
            "text_config": {"model_type": "llama", **llama.transformers_config(config.text)},
            "image_token_index": config.image_token_index,
            "vision_feature_layer": list(layer) if isinstance(layer, tuple) else layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "projector_hidden_act": "gelu", "multimodal_projector_bias": config.projector_bias,
            "image_seq_length": config.tokens_per_image}


def llava_from_transformers(source: Source, config=None, *, dtype: torch.dtype = torch.float32,
                            image_attention: str = "causal") -> LLaVA:
    """A vlfast LLaVA (parameters in `dtype`, on the CPU) from LlavaForConditionalGeneration weights: a
    state dict, a .safetensors / weights-only file, or a save_pretrained folder (sharded too), in either
    key layout. config: a vlfast LlavaConfig, a transformers LlavaConfig or its dict; default: the
    config.json beside the weights."""
    config = model_config(source, config, LlavaConfig, lambda c: config_from_transformers(c, image_attention),
                          "LlavaConfig")
    state_dict = read_state_dict(source)
    layout = layout_of(state_dict)
    ignored = [LAYOUTS[layout][2] + k for k in llama.NON_WEIGHTS] + [LAYOUTS[layout][0] + "embeddings.position_ids"]
    if config.text.tie_word_embeddings:
        ignored.append(LAYOUTS[layout][3])
    state = convert(state_dict, key_map(config, layout), _shapes(config),
                    f"this transformers LLaVA checkpoint ({layout} key layout) does not fit the config", ignored)
    with torch.device("meta"):  # no random initialisation: every parameter is overwritten below
        model = LLaVA(config).to(dtype)
    model.to_empty(device="cpu")
    if config.text.tie_word_embeddings:
        model.language_model.lm_head.weight = model.language_model.embed.weight
    model.load_state_dict(state, strict=True)
    return model


def llava_to_transformers(model: LLaVA, layout: str = "v5") -> tuple[dict, dict]:
    """(state dict under transformers' keys, transformers LlavaConfig fields)."""
    state = export(model.state_dict(), key_map(model.config, layout))
    if model.config.text.tie_word_embeddings:
        head, decoder = LAYOUTS[layout][3], LAYOUTS[layout][2]
        state[head] = state[f"{decoder}embed_tokens.weight"].clone()
    return state, transformers_config(model.config)
