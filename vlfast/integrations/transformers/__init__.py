"""Hugging Face transformers integration (imports transformers on use).

register()        adds "vlfast" to transformers' attention registry: attn_implementation="vlfast" routes
                  CLIP, SigLIP, LLaMA and LLaVA attention through vlfast.attention (attention.py).
patch(model) / causal_lm_loss(model, labels, **inputs)
                  a causal LM's loss through vlfast.linear_cross_entropy, without logits (loss.py).
"""
from .attention import attention_forward, register
from .loss import causal_lm_loss, patch

__all__ = ["register", "attention_forward", "causal_lm_loss", "patch"]
