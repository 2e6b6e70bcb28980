"""LLaMA checkpoints: transformers' LlamaForCausalLM <-> vlfast.models.Llama.

The key map is the whole story: transformers' separate q, k, v projections are concatenated into one
qkv (its biases too, with attention_bias), every other tensor maps one to one. `prefix` / `head` place
the decoder and the LM head inside a larger checkpoint (LLaVA's "language_model.model." /
"language_model.lm_head.weight" or "model.language_model." / "lm_head.weight"). Files are read with
safetensors or torch.load(weights_only=True) only.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..models.llama import Llama, LlamaConfig
from .checkpoint import CheckpointError, Concatenated, Source, convert, export, model_config, read_state_dict

# Buffers some transformers versions save beside the weights.
NON_WEIGHTS = ("rotary_emb.inv_freq",)


def key_map(config: LlamaConfig, prefix: str = "model.", head: str = "lm_head.weight") -> dict:
    """{vlfast key: checkpoint key or Concatenated(keys, rows)} for every layer."""
    out = {"embed.weight": f"{prefix}embed_tokens.weight", "norm.weight": f"{prefix}norm.weight",
           "lm_head.weight": f"{prefix}embed_tokens.weight" if config.tie_word_embeddings else head}
    for i in range(config.num_layers):
        theirs, ours = f"{prefix}layers.{i}.", f"layers.{i}."
        out[ours + "input_norm.weight"] = theirs + "input_layernorm.weight"
        out[ours + "post_norm.weight"] = theirs + "post_attention_layernorm.weight"
        q_rows, kv_rows = config.num_heads * config.dim_per_head, config.kv_heads * config.dim_per_head
        for kind in ("weight", "bias") if config.attention_bias else ("weight",):
            out[ours + f"attn.qkv.{kind}"] = Concatenated(tuple(theirs + f"self_attn.{x}_proj.{kind}" for x in "qkv"),
                                                          (q_rows, kv_rows, kv_rows))
            out[ours + f"attn.out.{kind}"] = theirs + f"self_attn.o_proj.{kind}"
        for name in ("gate", "up", "down"):
            for kind in ("weight", "bias") if config.mlp_bias else ("weight",):
                out[ours + f"mlp.{name}.{kind}"] = theirs + f"mlp.{name}_proj.{kind}"
    return out


def _expected_shapes(config: LlamaConfig) -> dict:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}


def convert_state_dict(state_dict: Mapping, config: LlamaConfig, prefix: str = "model.",
                       head: str = "lm_head.weight", others: tuple = ()) -> dict:
    """transformers' tensors -> vlfast's Llama state dict; raises CheckpointError listing every missing,
    unexpected and mis-shaped key. others: keys of the checkpoint that belong to other parts of a larger
    model (not unexpected here)."""
    ignored = {prefix + k for k in NON_WEIGHTS} | set(others)
    if config.tie_word_embeddings:
        ignored.add(head)  # present in some saves of tied models: the embedding's own tensor
    return convert(state_dict, key_map(config, prefix, head), _expected_shapes(config),
                   "this transformers LLaMA checkpoint does not fit the config", ignored)


def config_from_transformers(hf_config) -> LlamaConfig:
    """A vlfast LlamaConfig from a transformers LlamaConfig or its config.json dict (rope settings in
    either transformers' older rope_theta / rope_scaling fields or the newer rope_parameters)."""
    d = hf_config if isinstance(hf_config, Mapping) else hf_config.to_dict()
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"LLaMA's MLP is SwiGLU (hidden_act 'silu'), got {act!r}")
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    heads = d["num_attention_heads"]
    return LlamaConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                       intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"], num_heads=heads,
                       num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=d.get("head_dim"),
                       rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
                       rope_scaling=None if kind == "default" else rope,
                       max_position_embeddings=d.get("max_position_embeddings", 2048),
                       tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                       attention_bias=bool(d.get("attention_bias", False)), mlp_bias=bool(d.get("mlp_bias", False)))


def transformers_config(config: LlamaConfig) -> dict:
    """The transformers LlamaConfig fields for `config` (transformers.LlamaConfig(**this))."""
    return {"vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads, "num_key_value_heads": config.kv_heads,
            "head_dim": config.dim_per_head, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
            "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
            "max_position_embeddings": config.max_position_embeddings, "hidden_act": "silu",
            "tie_word_embeddings": config.tie_word_embeddings, "attention_bias": config.attention_bias,
            "mlp_bias": config.mlp_bias}


def llama_from_transformers(source: Source, config=None, *, dtype: torch.dtype = torch.float32,
                            prefix: str = "model.", head: str = "lm_head.weight") -> Llama:
    """A vlfast Llama (parameters in `dtype`, on the CPU) from LlamaForCausalLM weights: a state dict, a
    .safetensors / weights-only file, or a save_pretrained folder (sharded too). config: a vlfast
    LlamaConfig, a transformers LlamaConfig or its dict; default: the config.json beside the weights."""
    config = model_config(source, config, LlamaConfig, config_from_transformers, "LlamaConfig")
    state = convert_state_dict(read_state_dict(source), config, prefix, head)
    with torch.device("meta"):  # no random initialisation: every parameter is overwritten below
        model = Llama(config).to(dtype)
    model.to_empty(device="cpu")
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight  # to_empty unties them
        state.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise CheckpointError("internal key map error", missing, unexpected)
    return model


def llama_to_transformers(model: Llama, prefix: str = "model.", head: str = "lm_head.weight") -> tuple[dict, dict]:
    """(state dict under transformers' keys, transformers LlamaConfig fields) for a vlfast Llama."""
    state = export(model.state_dict(), key_map(model.config, prefix, head))
    if model.config.tie_word_embeddings:
        state[head] = state[f"{prefix}embed_tokens.weight"].clone()
    return state, transformers_config(model.config)

