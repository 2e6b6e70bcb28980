"""The one place where vlfast's models compute attention: vlfast.attention.

  - image towers (causal=False, no padding): the bidirectional kernel;
  - text towers (causal=True) with a key padding mask: the padded batch is packed by its real tokens
    and goes through vlfast.attention_varlen, so padding costs no work; without padding, the dense
    causal kernel.
The math (the meaning of the masks is in ../../shared/design.md): query i attends to key j when j <= i
(causal) and key j is not padding. Outputs at padded query positions are 0 (nothing downstream reads
them: the towers pool real tokens).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import masks
from ..ops.attention import attention, attention_varlen


def _check(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"attend: q, k, v must share one shape (batch, heads, seq, head_dim), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if key_padding_mask is not None:
        b, _, s, _ = q.shape
        if key_padding_mask.shape != (b, s):
            raise ValueError(f"attend: key_padding_mask must be (batch, seq) = {(b, s)}, "
                             f"got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"attend: key_padding_mask must be bool (True = a real token), "
                            f"got {key_padding_mask.dtype}")


def attend(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Optional[Tensor] = None,
           impl: str = "auto") -> Tensor:
    """softmax(q k^T / sqrt(head_dim) + mask) v for q, k, v (B, H, S, Dh) -> (B, H, S, Dh).

    causal: query i sees keys j <= i. key_padding_mask (B, S) bool, True where the token is real:
    padded keys are never attended to, padded queries give 0.
    """
    _check(q, k, v, key_padding_mask)
    if key_padding_mask is None:
        return attention(q, k, v, mask=masks.causal() if causal else None, impl=impl)
    b, h, s, d = q.shape
    lengths = key_padding_mask.sum(dim=1)
    cu = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
    packed = [x.transpose(1, 2)[key_padding_mask] for x in (q, k, v)]  # (T, H, Dh), real tokens in order
    out = attention_varlen(*packed, cu, cu, s, s, mask=masks.causal() if causal else None, impl=impl)
    full = out.new_zeros(b, s, h, d)
    full[key_padding_mask] = out
    return full.transpose(1, 2)
