"""Hugging Face transformers: a causal LM's loss through vlfast.linear_cross_entropy.

`causal_lm_loss(model, labels, **inputs)` runs the model's body (the decoder, or LLaVA's vision tower +
projector + decoder) and the LM-head cross-entropy without the (tokens x vocabulary) logits.
`patch(model)` makes `model(..., labels=...)` do the same and return logits=None, so a training loop
or transformers' Trainer needs no other change. Labels follow transformers' causal-LM convention:
the loss of position t predicts labels[t + 1] (or pass shift_labels), -100 is ignored, and with
num_items_in_batch (gradient accumulation) the sum is divided by it.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ...ops.linear_cross_entropy import linear_cross_entropy

_LOSS_ONLY_KWARGS = ("logits_to_keep", "num_items_in_batch", "shift_labels", "return_dict")


def _body_and_head(model):
    body = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or head is None or not hasattr(head, "weight"):
        raise TypeError(f"vlfast: {type(model).__name__} has no base model and linear output head "
                        "(expected a transformers *ForCausalLM or *ForConditionalGeneration model)")
    return body, head


def _softcap(model) -> Optional[float]:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return getattr(config, "final_logit_softcapping", None)  # Gemma 2 caps its logits


def causal_lm_loss(model, labels: Tensor, *, shift_labels: Optional[Tensor] = None,
                   num_items_in_batch=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                   z_loss: float = 0.0, impl: str = "auto", **inputs):
    """(loss, the body's outputs): the model's causal-LM loss for `labels` (B, T), never forming logits.

    inputs are the model's own keyword arguments (input_ids, attention_mask, pixel_values, ...).
    """
    body, head = _body_and_head(model)
    outputs = body(**{k: v for k, v in inputs.items() if k not in _LOSS_ONLY_KWARGS})
    hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
    if shift_labels is None:  # position t predicts token t + 1; the last position predicts nothing
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if shift_labels.shape != hidden.shape[:-1]:
        raise ValueError(f"vlfast: labels {tuple(shift_labels.shape)} do not match the model's hidden states "
                         f"{tuple(hidden.shape[:-1])}")
    weight = head.weight.to(hidden.dtype)  # as autocast would cast it for the head's matmul
    bias = head.bias.to(hidden.dtype) if getattr(head, "bias", None) is not None else None
    loss = linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight,
                                shift_labels.reshape(-1).to(hidden.device), bias=bias, ignore_index=ignore_index,
                                reduction="mean" if num_items_in_batch is None else "sum",
                                label_smoothing=label_smoothing, logit_softcap=_softcap(model), z_loss=z_loss,
                                impl=impl)
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss, outputs


def patch(model, *, ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
          impl: str = "auto"):
    """Make `model(..., labels=...)` compute its loss through vlfast and return logits=None.

    Calls without labels (generation, evaluation of logits) go to the original forward unchanged.
    Returns the model; `model.forward.__wrapped__` is the original.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    original = model.forward
    if getattr(original, "_vlfast_patched", False):
        return model
    fields = set(CausalLMOutputWithPast.__dataclass_fields__) - {"loss", "logits"}

    @functools.wraps(original)
    def forward(*args, labels=None, **kwargs):
        if labels is None:
            return original(*args, **kwargs)
        if args:
            raise TypeError("vlfast-patched forward takes keyword arguments only (input_ids=..., labels=...)")
        loss, outputs = causal_lm_loss(model, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
                                       z_loss=z_loss, impl=impl, **kwargs)
        # The body's cache, hidden states and attentions, under whatever names this transformers uses.
        extras = {k: v for k, v in outputs.items() if k in fields}
        return CausalLMOutputWithPast(loss=loss, logits=None, **extras)

    forward._vlfast_patched = True
    model.forward = forward
    return model
