"""CLIP checkpoints: transformers' CLIPModel and OpenAI / open_clip layouts <-> vlfast.models.CLIP.

The key maps below are the whole story: each vlfast parameter comes from one checkpoint tensor,
from OpenAI's (in, out) projection matrices transposed, or from transformers' separate q, k, v
projections concatenated into one qkv. Checkpoints are read with safetensors or
torch.load(weights_only=True) only; nothing in a file is ever executed.

Every check runs before any weight is copied, and one CheckpointError lists every missing key,
unexpected key and shape mismatch at once.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Union

import torch

from ..models.clip import CLIP, CLIPConfig, TextConfig, VisionConfig
from .checkpoint import (CheckpointError, Source, Transposed, _check_tensors, _load_file, convert, export, model_config,
                         read_state_dict)


# vlfast key -> transformers key. A tuple is concatenated along dim 0 (q, k, v -> qkv).
TRANSFORMERS_KEYS = {
    "logit_scale": "logit_scale",
    "visual.patch_embed.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_token": "vision_model.embeddings.class_embedding",
    "visual.pos_embed": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "visual.proj.weight": "visual_projection.weight",
    "text.token_embed.weight": "text_model.embeddings.token_embedding.weight",
    "text.pos_embed": "text_model.embeddings.position_embedding.weight",
    "text.ln_final.weight": "text_model.final_layer_norm.weight",
    "text.ln_final.bias": "text_model.final_layer_norm.bias",
    "text.proj.weight": "text_projection.weight",
}
# Inside block {}: vlfast "<tower>.blocks.{}.<key>" <- transformers "<tower prefix>.{}.<key>".
TRANSFORMERS_BLOCK_KEYS = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "attn.out.weight": "self_attn.out_proj.weight",
    "attn.out.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.fc.weight": "mlp.fc1.weight",
    "mlp.fc.bias": "mlp.fc1.bias",
    "mlp.proj.weight": "mlp.fc2.weight",
    "mlp.proj.bias": "mlp.fc2.bias",
}
TRANSFORMERS_TOWERS = {"visual": "vision_model.encoder.layers", "text": "text_model.encoder.layers"}
# Buffers that transformers' older checkpoints saved (aranges, rebuilt by the model): not weights.
TRANSFORMERS_NON_WEIGHTS = ("vision_model.embeddings.position_ids", "text_model.embeddings.position_ids")

# vlfast key -> OpenAI / open_clip key.
OPENAI_KEYS = {
    "logit_scale": "logit_scale",
    "visual.patch_embed.weight": "visual.conv1.weight",
    "visual.class_token": "visual.class_embedding",
    "visual.pos_embed": "visual.positional_embedding",
    "visual.ln_pre.weight": "visual.ln_pre.weight",
    "visual.ln_pre.bias": "visual.ln_pre.bias",
    "visual.ln_post.weight": "visual.ln_post.weight",
    "visual.ln_post.bias": "visual.ln_post.bias",
    "visual.proj.weight": Transposed("visual.proj"),
    "text.token_embed.weight": "token_embedding.weight",
    "text.pos_embed": "positional_embedding",
    "text.ln_final.weight": "ln_final.weight",
    "text.ln_final.bias": "ln_final.bias",
    "text.proj.weight": Transposed("text_projection"),
}
OPENAI_BLOCK_KEYS = {
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "attn.qkv.weight": "attn.in_proj_weight",
    "attn.qkv.bias": "attn.in_proj_bias",
    "attn.out.weight": "attn.out_proj.weight",
    "attn.out.bias": "attn.out_proj.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.fc.weight": "mlp.c_fc.weight",
    "mlp.fc.bias": "mlp.c_fc.bias",
    "mlp.proj.weight": "mlp.c_proj.weight",
    "mlp.proj.bias": "mlp.c_proj.bias",
}
OPENAI_TOWERS = {"visual": "visual.transformer.resblocks", "text": "transformer.resblocks"}
# Metadata that OpenAI's TorchScript models carry beside the weights; the weights' shapes say the same.
OPENAI_NON_WEIGHTS = ("input_resolution", "context_length", "vocab_size")

LAYOUTS = {
    "transformers": (TRANSFORMERS_KEYS, TRANSFORMERS_BLOCK_KEYS, TRANSFORMERS_TOWERS, TRANSFORMERS_NON_WEIGHTS),
    "openai": (OPENAI_KEYS, OPENAI_BLOCK_KEYS, OPENAI_TOWERS, OPENAI_NON_WEIGHTS),
}


def key_map(layout: str, config: CLIPConfig) -> dict:
    """{vlfast key: checkpoint key, tuple of keys (concatenated) or Transposed(key)} for every layer."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(LAYOUTS)}, got {layout!r}")
    keys, block_keys, towers, _ = LAYOUTS[layout]
    out = dict(keys)
    for tower, prefix in towers.items():
        for i in range(getattr(config, "vision" if tower == "visual" else "text").layers):
            for ours, theirs in block_keys.items():
                theirs = tuple(f"{prefix}.{i}.{k}" for k in theirs) if isinstance(theirs, tuple) else f"{prefix}.{i}.{theirs}"
                out[f"{tower}.blocks.{i}.{ours}"] = theirs
    return out


def _expected_shapes(config: CLIPConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in CLIP(config).state_dict().items()}


def convert_state_dict(state_dict: Mapping, config: CLIPConfig, layout: str) -> dict:
    """A checkpoint's tensors in `layout` ("transformers" | "openai") -> vlfast's state dict for `config`.

    Raises CheckpointError listing every missing key, unexpected key and shape mismatch.
    """
    return convert(state_dict, key_map(layout, config), _expected_shapes(config),
                   f"this {layout}-layout checkpoint does not fit the CLIP config", LAYOUTS[layout][3])


def export_state_dict(model_or_state_dict: Union[CLIP, Mapping], config: Optional[CLIPConfig], layout: str) -> dict:
    """vlfast's weights under `layout`'s keys (the inverse of convert_state_dict), as separate contiguous
    copies (safetensors refuses tensors that share memory)."""
    if isinstance(model_or_state_dict, CLIP):
        config = model_or_state_dict.config if config is None else config
        state = model_or_state_dict.state_dict()
    elif config is None:
        raise ValueError("config is required when exporting a state dict (a CLIP model carries its own)")
    else:
        state = model_or_state_dict
    return export(state, key_map(layout, config))


# ---- configs ------------------------------------------------------------------------------------

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that leave fields out.
_TRANSFORMERS_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                               "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_TRANSFORMERS_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                 "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# transformers' activation names -> vlfast's (gelu_new and gelu_pytorch_tanh are the same tanh formula)
_ACT_FROM_TRANSFORMERS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                          "gelu_pytorch_tanh": "gelu_tanh"}
_ACT_TO_TRANSFORMERS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
# transformers' CLIPTextModel pools at the largest id when eos_token_id == 2 (its configs before
# transformers PR #24773), else at the first eos_token_id.
_LEGACY_EOS = 2
_TRANSFORMERS_SPECIAL_IDS = {"bos_token_id": 49406, "pad_token_id": 1}


def _act(name, where: str) -> str:
    if name not in _ACT_FROM_TRANSFORMERS:
        raise ValueError(f"{where}.hidden_act {name!r} is not supported; vlfast has {tuple(_ACT_FROM_TRANSFORMERS)}")
    return _ACT_FROM_TRANSFORMERS[name]


def vision_key_map(cfg: VisionConfig, prefix: str) -> dict:
    """The image tower alone (no projection), keys relative to it (patch_embed.weight, ...), from a
    transformers CLIP vision transformer whose keys start with `prefix` where CLIPModel's start with
    "vision_model." (LLaVA's vision tower: e.g. "model.vision_tower.")."""
    def theirs(key: str) -> str:
        return prefix + key[len("vision_model."):]

    out = {ours[len("visual."):]: theirs(key) for ours, key in TRANSFORMERS_KEYS.items()
           if ours.startswith("visual.") and ours != "visual.proj.weight"}
    tower = TRANSFORMERS_TOWERS["visual"]
    for i in range(cfg.layers):
        for ours, key in TRANSFORMERS_BLOCK_KEYS.items():
            out[f"blocks.{i}.{ours}"] = tuple(theirs(f"{tower}.{i}.{k}") for k in key) if isinstance(key, tuple) \
                else theirs(f"{tower}.{i}.{key}")
    return out


def vision_config_from_transformers(vision: Mapping) -> VisionConfig:
    """VisionConfig from a transformers CLIPVisionConfig's dict (missing fields: transformers' defaults)."""
    vision = {**_TRANSFORMERS_VISION_DEFAULTS, **vision}
    return VisionConfig(image_size=vision["image_size"], patch_size=vision["patch_size"], width=vision["hidden_size"],
                        layers=vision["num_hidden_layers"], heads=vision["num_attention_heads"],
                        mlp_dim=vision["intermediate_size"], channels=vision["num_channels"],
                        act=_act(vision["hidden_act"], "vision_config"), ln_eps=float(vision["layer_norm_eps"]))


def config_from_transformers(hf_config) -> CLIPConfig:
    """CLIPConfig from a transformers CLIPConfig (object) or its config.json contents (dict)."""
    d = hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config
    if not isinstance(d, Mapping):
        raise TypeError(f"hf_config must be a transformers CLIPConfig or a dict, got {type(hf_config).__name__}")
    text = {**_TRANSFORMERS_TEXT_DEFAULTS, **(d.get("text_config") or d.get("text_config_dict") or {})}
    vision = {**_TRANSFORMERS_VISION_DEFAULTS, **(d.get("vision_config") or d.get("vision_config_dict") or {})}
    eos = text["eos_token_id"]
    if isinstance(eos, (list, tuple)):
        raise ValueError(f"text_config.eos_token_id is a list {eos}; CLIP's text tower pools at one token id")
    return CLIPConfig(
        embed_dim=d.get("projection_dim", 512),
        logit_scale_init=float(d.get("logit_scale_init_value", 2.6592)),
        vision=vision_config_from_transformers(vision),
        text=TextConfig(vocab_size=text["vocab_size"], context_length=text["max_position_embeddings"],
                        width=text["hidden_size"], layers=text["num_hidden_layers"],
                        heads=text["num_attention_heads"], mlp_dim=text["intermediate_size"],
                        act=_act(text["hidden_act"], "text_config"), ln_eps=float(text["layer_norm_eps"]),
                        eos_token_id=None if eos in (None, _LEGACY_EOS) else eos))


def transformers_config(config: CLIPConfig) -> dict:
    """Keyword arguments for transformers.CLIPConfig(**...) describing the same model."""
    v, t = config.vision, config.text
    if t.eos_token_id == _LEGACY_EOS:
        raise ValueError("transformers reads eos_token_id=2 as 'pool at the largest id', so a model pooling at "
                         "token id 2 has no transformers config")
    return {
        "projection_dim": config.embed_dim,
        "logit_scale_init_value": config.logit_scale_init,
        "text_config": {"vocab_size": t.vocab_size, "hidden_size": t.width, "intermediate_size": t.mlp_dim,
                        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "hidden_act": _ACT_TO_TRANSFORMERS[t.act],
                        "layer_norm_eps": t.ln_eps, "projection_dim": config.embed_dim,
                        "eos_token_id": _LEGACY_EOS if t.eos_token_id is None else t.eos_token_id,
                        # transformers' default bos / pad ids (49406, 1) are invalid in a small vocabulary
                        **{k: None for k, default in _TRANSFORMERS_SPECIAL_IDS.items() if default >= t.vocab_size}},
        "vision_config": {**vision_transformers_config(v), "projection_dim": config.embed_dim},
    }


def vision_transformers_config(v: VisionConfig) -> dict:
    """transformers CLIPVisionConfig fields for the image tower `v`."""
    return {"hidden_size": v.width, "intermediate_size": v.mlp_dim, "num_hidden_layers": v.layers,
            "num_attention_heads": v.heads, "num_channels": v.channels, "image_size": v.image_size,
            "patch_size": v.patch_size, "hidden_act": _ACT_TO_TRANSFORMERS[v.act], "layer_norm_eps": v.ln_eps}


def _count_layers(state_dict: Mapping, prefix: str) -> int:
    return len({k[len(prefix) + 1:].split(".")[0] for k in state_dict if k.startswith(prefix + ".")})


# The weights do not say how many attention heads a tower has, only its width; heads = width // head width.
# OpenAI's ViT-B/32, B/16, L/14 (and L/14-336) use 64-wide heads in both towers, with these widths:
OPENAI_WIDTHS = {"vision": (768, 1024), "text": (512, 768)}
OPENAI_HEAD_WIDTH = 64
# open_clip's models by name (the "-quickgelu" variants alike): (vision width, vision head width, text head
# width). Its wider ViTs use wider heads; every text tower uses 64.
OPEN_CLIP_HEAD_WIDTHS = {
    "ViT-B-32": (768, 64, 64),
    "ViT-B-16": (768, 64, 64),
    "ViT-L-14": (1024, 64, 64),
    "ViT-L-14-336": (1024, 64, 64),
    "ViT-H-14": (1280, 80, 64),
    "ViT-g-14": (1408, 88, 64),
    "ViT-bigG-14": (1664, 104, 64),
}


def _check_head_width(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _head_widths(widths: dict, model_name: Optional[str], head_width: Optional[int],
                 vision_head_width: Optional[int], text_head_width: Optional[int]) -> dict:
    """{tower: (head width, the argument it came from)} for the towers' widths {"vision": w, "text": w}."""
    per_tower = {"vision": vision_head_width, "text": text_head_width}
    given = {n: v for n, v in (("head_width", head_width), ("vision_head_width", vision_head_width),
                               ("text_head_width", text_head_width)) if v is not None}
    for n, v in given.items():
        _check_head_width(n, v)
    if model_name is not None:
        if given:
            raise ValueError(f"pass either model_name or head widths ({', '.join(given)}), not both")
        key = model_name.replace("/", "-")
        key = key[:-len("-quickgelu")] if key.endswith("-quickgelu") else key
        if key not in OPEN_CLIP_HEAD_WIDTHS:
            raise ValueError(f"unknown model_name {model_name!r}; known: {', '.join(OPEN_CLIP_HEAD_WIDTHS)} "
                             "(or pass vision_head_width / text_head_width)")
        vision_width, vision_hw, text_hw = OPEN_CLIP_HEAD_WIDTHS[key]
        if widths["vision"] != vision_width:
            raise ValueError(f"model_name {model_name!r} has vision width {vision_width}; the checkpoint's is "
                             f"{widths['vision']}")
        return {"vision": (vision_hw, "model_name"), "text": (text_hw, "model_name")}
    if not given:
        # No spec: only OpenAI's own layouts are known to have 64-wide heads. Guessing for any other width
        # loads, say, ViT-H/14 (80-wide heads) into a model with the wrong number of heads, without an error.
        for tower, width in widths.items():
            if width not in OPENAI_WIDTHS[tower]:
                raise ValueError(
                    f"{tower} width {width} is not one of OpenAI's {OPENAI_WIDTHS[tower]} (64-wide heads), and the "
                    f"weights do not give the number of heads: pass model_name (one of "
                    f"{', '.join(OPEN_CLIP_HEAD_WIDTHS)}) or vision_head_width / text_head_width (open_clip's "
                    f"ViT-H-14: 80, ViT-g-14: 88, ViT-bigG-14: 104; text towers: 64)")
        return {t: (OPENAI_HEAD_WIDTH, "the default head width") for t in widths}
    out = {}
    for tower in widths:
        if per_tower[tower] is not None:
            out[tower] = (per_tower[tower], f"{tower}_head_width")
        elif head_width is not None:
            out[tower] = (head_width, "head_width")
        else:
            out[tower] = (OPENAI_HEAD_WIDTH, f"{tower}_head_width (default {OPENAI_HEAD_WIDTH})")
    return out


def config_from_openai(state_dict: Mapping, *, act: str, model_name: Optional[str] = None,
                       head_width: Optional[int] = None, vision_head_width: Optional[int] = None,
                       text_head_width: Optional[int] = None) -> CLIPConfig:
    """CLIPConfig from an OpenAI-layout state dict's shapes, as OpenAI's build_model does.

    act: "quick_gelu" for OpenAI's weights and open_clip's *-quickgelu models, "gelu" for open_clip's
    other models; the weights cannot tell. Nor can they tell the number of heads (width // head width):
    model_name (an open_clip name, OPEN_CLIP_HEAD_WIDTHS) or the head widths give it: head_width for
    both towers, vision_head_width / text_head_width for one (the other then 64, as every open_clip text
    tower). Without any of these only OpenAI's own widths (64-wide heads) are accepted.
    """
    need = ("visual.conv1.weight", "visual.positional_embedding", "token_embedding.weight", "positional_embedding",
            "ln_final.weight", "text_projection")
    missing = [k for k in need if k not in state_dict]
    if missing:
        raise CheckpointError("not an OpenAI-layout CLIP state dict (cannot read its shapes)", missing=missing)
    conv = state_dict["visual.conv1.weight"]
    widths = {"vision": conv.shape[0], "text": state_dict["ln_final.weight"].shape[0]}
    head_widths = _head_widths(widths, model_name, head_width, vision_head_width, text_head_width)
    heads = {}
    for tower, (hw, source) in head_widths.items():
        if widths[tower] % hw:
            raise ValueError(f"{source} ({hw}) does not divide the {tower} width ({widths[tower]}) of this "
                             "checkpoint")
        heads[tower] = widths[tower] // hw
    grid = math.isqrt(state_dict["visual.positional_embedding"].shape[0] - 1)
    vision_layers = _count_layers(state_dict, OPENAI_TOWERS["visual"])
    text_layers = _count_layers(state_dict, OPENAI_TOWERS["text"])
    mlp = {t: state_dict.get(f"{p}.0.mlp.c_fc.weight") for t, p in OPENAI_TOWERS.items()}
    if any(m is None for m in mlp.values()):
        raise CheckpointError("not an OpenAI-layout CLIP state dict", missing=[
            f"{p}.0.mlp.c_fc.weight" for t, p in OPENAI_TOWERS.items() if mlp[t] is None])
    return CLIPConfig(
        embed_dim=state_dict["text_projection"].shape[1],
        vision=VisionConfig(image_size=conv.shape[-1] * grid, patch_size=conv.shape[-1], width=widths["vision"],
                            layers=vision_layers, heads=heads["vision"],
                            mlp_dim=mlp["visual"].shape[0], channels=conv.shape[1], act=act),
        text=TextConfig(vocab_size=state_dict["token_embedding.weight"].shape[0],
                        context_length=state_dict["positional_embedding"].shape[0], width=widths["text"],
                        layers=text_layers, heads=heads["text"], mlp_dim=mlp["text"].shape[0], act=act))


# ---- models -------------------------------------------------------------------------------------

def _model(config: CLIPConfig, state: dict, dtype: torch.dtype) -> CLIP:
    with torch.device("meta"):  # no random initialisation: every parameter is overwritten below
        model = CLIP(config).to(dtype)
    model.to_empty(device="cpu")
    model.load_state_dict(state, strict=True)
    return model


def clip_from_transformers(source: Source, config=None, *, dtype: torch.dtype = torch.float32) -> CLIP:
    """A vlfast CLIP (parameters in `dtype`, on the CPU) from transformers' CLIPModel weights.

    source: a state dict, a .safetensors / weights-only .bin file, or a save_pretrained folder.
    config: a vlfast CLIPConfig, a transformers CLIPConfig or its config.json dict; default: the
    config.json in the folder (or beside the file). A bare state dict needs it: the number of heads
    is not in the weights.
    """
    config = model_config(source, config, CLIPConfig, config_from_transformers, "CLIPConfig")
    return _model(config, convert_state_dict(read_state_dict(source), config, "transformers"), dtype)


def _unwrap_open_clip(state):
    # open_clip's training checkpoints: {"state_dict": ..., "epoch": ..., ...}, keys "module."-prefixed under DDP.
    if not isinstance(state, Mapping):
        return state  # _check_tensors names what it is
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = dict(state["state_dict"])
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def clip_from_openai(source: Source, config: Optional[CLIPConfig] = None, *, act: Optional[str] = None,
                     model_name: Optional[str] = None, head_width: Optional[int] = None,
                     vision_head_width: Optional[int] = None, text_head_width: Optional[int] = None,
                     dtype: torch.dtype = torch.float32) -> CLIP:
    """A vlfast CLIP (parameters in `dtype`, on the CPU) from an OpenAI / open_clip state dict (a dict,
    .safetensors or weights-only file).

    open_clip training checkpoints ({"state_dict": ...}, keys prefixed "module.") are unwrapped.
    Without config the shapes give it (config_from_openai), and act must be given: "quick_gelu" for
    OpenAI's weights and open_clip's *-quickgelu models, "gelu" for open_clip's other models, and any
    width other than OpenAI's needs model_name or the head widths (see config_from_openai): the
    weights do not give the number of heads.
    """
    if isinstance(source, Mapping):
        state = _unwrap_open_clip(dict(source))
    else:
        path = Path(source)
        state = _unwrap_open_clip(_load_file(path) if path.is_file() else read_state_dict(path))
    _check_tensors(state)
    if config is None:
        if act is None:
            raise ValueError("act is required without a config: 'quick_gelu' for OpenAI's weights and open_clip's "
                             "*-quickgelu models, 'gelu' for open_clip's other models (the weights cannot tell)")
        config = config_from_openai(state, act=act, model_name=model_name, head_width=head_width,
                                    vision_head_width=vision_head_width, text_head_width=text_head_width)
    else:
        given = [n for n, v in (("act", act), ("model_name", model_name), ("head_width", head_width),
                                ("vision_head_width", vision_head_width), ("text_head_width", text_head_width))
                 if v is not None]
        if given:
            raise ValueError(f"pass either config or {', '.join(given)}, not both (the config carries the "
                             "activation and the number of heads)")
    return _model(config, convert_state_dict(state, config, "openai"), dtype)


def clip_to_transformers(model: CLIP) -> tuple:
    """(state dict under transformers' CLIPModel keys, kwargs for transformers.CLIPConfig)."""
    return export_state_dict(model, None, "transformers"), transformers_config(model.config)


def clip_to_openai(model: CLIP) -> dict:
    """State dict under OpenAI / open_clip keys (projections transposed back to (in, out))."""
    return export_state_dict(model, None, "openai")
