"""transformers' attention registry entry "vlfast": its models' attention through vlfast.attention.

transformers hands an attention function (B, H, S, D) queries, keys and values, the mask its mask
function built, and the layer's flags. vlfast registers FlashAttention's mask function with it,
which passes either no mask or the (B, Sk) padding mask; together with the layer's causal flag,
its sliding window and packed-sequence offsets, that maps onto vlfast.masks exactly. Arbitrary 4-D
masks are refused with a clear error (use attn_implementation="sdpa" for those).

During generate(), transformers calls it with a few new queries against the whole cache (its cache
already holds the new keys): without gradients, that goes to vlfast.attention_decode, the split-K
decode kernel, with the cache as a full (B, Hkv, Sk, D) cache of Sk tokens per row.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import masks
from ...ops.attention import attention, attention_varlen
from ...ops.attention_decode import attention_decode

NAME = "vlfast"
_IMPL = {"impl": "auto"}
DECODE_MAX_QUERIES = 16  # a query block this short against a longer cache is a generation step


def _mask(causal: bool, padding: Optional[Tensor], sk: int, window: Optional[int]) -> Optional[masks.Mask]:
    mask = masks.sliding_window(int(window)) if window else (masks.causal() if causal else None)
    if padding is not None:
        if padding.dim() != 2:
            raise ValueError(f"vlfast attention takes a (batch, keys) padding mask, got shape {tuple(padding.shape)}; "
                             "for arbitrary 4-D masks use attn_implementation='sdpa'")
        pad = masks.key_padding(padding[:, -sk:].to(torch.bool))
        mask = pad if mask is None else mask & pad
    return mask


def attention_forward(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                      dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                      **kwargs):
    """transformers' attention-function signature: (B, H, Sq, D) in, ((B, Sq, H, D), None) out."""
    if dropout:
        raise ValueError(f"vlfast attention has no attention dropout (got {dropout}); set the model's "
                         "attention_dropout to 0 or use another attn_implementation")
    if kwargs.get("softcap") is not None:
        raise ValueError("vlfast attention does not cap attention logits (softcap); use attn_implementation='eager'")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    window = kwargs.get("sliding_window")
    impl = _IMPL["impl"]
    if kwargs.get("cu_seq_lens_q") is not None:  # packed sequences (batch 1): the varlen path
        cu_q, cu_k = kwargs["cu_seq_lens_q"].to(torch.int32), kwargs["cu_seq_lens_k"].to(torch.int32)
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, H, D)
        out = attention_varlen(q, k, v, cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"]),
                               mask=_mask(causal, None, k.shape[0], window), scale=scaling, impl=impl)
        return out[None], None
    mask = _mask(causal, attention_mask, key.shape[2], window)
    sq, sk = query.shape[2], key.shape[2]
    if sq <= DECODE_MAX_QUERIES and sk > sq and not (torch.is_grad_enabled() and query.requires_grad):
        key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (key, value))
        lengths = torch.full((key.shape[0],), sk, dtype=torch.int32, device=key.device)
        out = attention_decode(query, key, value, lengths, mask=mask, scale=scaling, impl=impl)
        return out.transpose(1, 2).contiguous(), None
    out = attention(query, key, value, mask=mask, scale=scaling, impl=impl)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME, *, impl: str = "auto") -> str:
    """Add `name` ("vlfast") to transformers' attention and attention-mask registries.

    Afterwards from_pretrained(..., attn_implementation="vlfast") or config._attn_implementation =
    "vlfast" runs the model's attention through vlfast.attention(impl=impl). Returns the name.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    _IMPL["impl"] = impl
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
