"""Attention masks for vision-language models, as small composable objects.

A mask says which keys each query may attend to. Query i of Sq and key j of Sk are compared at
positions p_q = i + (Sk - Sq) and p_k = j (queries are the last Sq positions: bottom-right aligned,
as in FlashAttention 2.1+ and KV-cache decoding). A pair is kept when every part of the mask keeps it:

  causal()                 p_k <= p_q
  sliding_window(w)        causal and p_q - p_k < w
  spans(ids)               tokens in the same bidirectional span (ids[p] >= 0 and equal) see each other
                           fully; every other pair is causal (LLaVA's image prefix, several images,
                           Transfusion-style interleaving). ids: (B, S) or (S,) int, -1 outside spans.
  dalle(text_len, rows, cols, kind="row"|"column"|"conv", kernel=k)
                           DALL-E's sparse layers over a text prefix and an R x C image grid (token
                           t >= T at row (t-T)//C, column (t-T)%C): causal everywhere; keys in the text
                           are kept; between image tokens "row" keeps the same row, "column" the same
                           column, "conv" |dr| <= k//2 and |dc| <= k//2.
  key_padding(valid)       keys with valid[b, j] False are never attended. valid: (B, Sk) bool
                           (key_padding.from_lengths(lengths, Sk) for right padding).

Combine parts with `&` (e.g. causal() & key_padding(valid)); None or no_mask() keeps every pair. Two
masks that both set window or dalle combine when those are equal and raise otherwise; two masks that
both set span_ids or key_valid must share the same tensor. A window counts back from the query, so
Mask(window=w) needs causal=True (sliding_window(w) sets it). A query with no key left gets output 0
and zero gradients. `to_dense(sq, sk)` gives the (B or 1, Sq, Sk)
boolean matrix, for tests and for peers that take dense masks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

DALLE_KINDS = {"row": 1, "column": 2, "conv": 3}


@dataclass(frozen=True, eq=False)
class Mask:
    """The parts of a mask; build one with the functions of this module and combine with `&`."""
    causal: bool = False
    window: Optional[int] = None                  # sliding window (implies causal)
    span_ids: Optional[Tensor] = None             # (B, S) or (S,) int32, -1 outside spans
    dalle: Optional[tuple] = None                 # (text_len, rows, cols, kind code, kernel)
    key_valid: Optional[Tensor] = None            # (B, Sk) bool

    def __post_init__(self):
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
                raise ValueError(f"vlfast.masks.Mask: window must be an int >= 1 or None, got {self.window!r}")
            if not self.causal:  # i - j < w alone would keep every later key: refuse rather than guess
                raise ValueError("vlfast.masks.Mask: window needs causal=True (a sliding window counts back from "
                                 "the query); use vlfast.masks.sliding_window(w)")

    def __and__(self, other: "Mask") -> "Mask":
        if not isinstance(other, Mask):
            return NotImplemented
        merged = {}
        for field in ("window", "dalle"):  # plain values: equal ones combine to themselves
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine is not None and theirs is not None and mine != theirs:
                raise ValueError(f"vlfast.masks: both masks set {field}, with different values ({mine} and "
                                 f"{theirs}); a mask holds one {field}")
            merged[field] = mine if mine is not None else theirs
        for field in ("span_ids", "key_valid"):  # tensors: comparing values would need a device sync
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine is not None and theirs is not None and mine is not theirs:
                raise ValueError(f"vlfast.masks: both masks set {field}; combine masks with different parts")
            merged[field] = mine if mine is not None else theirs
        return Mask(causal=self.causal or other.causal, **merged)

    # --- the predicate, in PyTorch (the specification; the kernels evaluate the same) -------------
    def allowed(self, p_q: Tensor, p_k: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        """Kept pairs for query positions p_q and key positions p_k (broadcasting int tensors);
        batch indexes span_ids / key_valid (broadcasting too) when they have a batch dimension."""
        keep = torch.ones(torch.broadcast_shapes(p_q.shape, p_k.shape), dtype=torch.bool, device=p_q.device)
        if self.causal:
            base = p_k <= p_q
            if self.span_ids is not None:  # a span relaxes causality between its own tokens
                span_q = _gather(self.span_ids, p_q, batch, -2)  # outside the sequence: in no span
                base = base | ((span_q == _gather(self.span_ids, p_k, batch, -3)) & (span_q >= 0))
            keep = keep & base
        if self.window is not None:
            keep = keep & (p_q - p_k < self.window)
        if self.dalle is not None:
            keep = keep & _dalle_keeps(p_q, p_k, *self.dalle)
        if self.key_valid is not None:
            keep = keep & _gather(self.key_valid, p_k, batch, False)
        return keep

    def to_dense(self, sq: int, sk: int, device=None) -> Tensor:
        """(B or 1, Sq, Sk) bool: True where query i may attend key j."""
        device = device or self._device() or "cpu"
        b = self.batch_size() or 1
        p_q = torch.arange(sq, device=device)[:, None] + (sk - sq)
        p_k = torch.arange(sk, device=device)[None, :]
        batch = torch.arange(b, device=device)[:, None, None]
        return self.allowed(p_q[None], p_k[None], batch).expand(b, sq, sk)

    # --- bookkeeping ------------------------------------------------------------------------------
    def batch_size(self) -> Optional[int]:
        """The batch the per-token parts describe (None when no part is per batch)."""
        sizes = {x.shape[0] for x in (self.span_ids, self.key_valid) if x is not None and x.dim() == 2}
        if len(sizes) > 1:
            raise ValueError(f"vlfast.masks: span_ids and key_valid disagree on the batch size: {sorted(sizes)}")
        return sizes.pop() if sizes else None

    def _device(self):
        for x in (self.span_ids, self.key_valid):
            if x is not None:
                return x.device
        return None

    def to(self, device) -> "Mask":
        return replace(self, span_ids=None if self.span_ids is None else self.span_ids.to(device),
                       key_valid=None if self.key_valid is None else self.key_valid.to(device))

    def describe(self) -> str:
        parts = [name for name, on in (("causal", self.causal), ("window", self.window is not None),
                                       ("spans", self.span_ids is not None), ("dalle", self.dalle is not None),
                                       ("key_padding", self.key_valid is not None)) if on]
        return "+".join(parts) or "none"

    def __repr__(self) -> str:
        return f"Mask({self.describe()})"


def _gather(per_token: Tensor, pos: Tensor, batch: Optional[Tensor], outside) -> Tensor:
    """per_token[(batch,) pos] for (S,) or (B, S) tensors; `outside` where pos is not in [0, S)."""
    inside = (pos >= 0) & (pos < per_token.shape[-1])
    pos = pos.clamp(0, per_token.shape[-1] - 1)
    values = per_token[pos] if per_token.dim() == 1 else per_token[(batch if batch is not None else 0), pos]
    return torch.where(inside, values, outside)


def _dalle_keeps(p_q: Tensor, p_k: Tensor, text_len: int, rows: int, cols: int, kind: int, kernel: int) -> Tensor:
    """DALL-E's rule between image tokens (text keys always kept; causality applied by the caller)."""
    key_text = p_k < text_len
    rq, cq = (p_q - text_len) // cols, (p_q - text_len) % cols
    rk, ck = (p_k - text_len) // cols, (p_k - text_len) % cols
    if kind == DALLE_KINDS["row"]:
        image = rq == rk
    elif kind == DALLE_KINDS["column"]:
        image = cq == ck
    else:
        half = kernel // 2
        image = ((rq - rk).abs() <= half) & ((cq - ck).abs() <= half)
    return key_text | image


# --- constructors -----------------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def no_mask() -> Mask:
    """Every pair kept (bidirectional attention: CLIP's image tower)."""
    return Mask()


def causal() -> Mask:
    return Mask(causal=True)


def sliding_window(window: int) -> Mask:
    """Causal attention to the last `window` positions (the query's own included)."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"vlfast.masks.sliding_window: window must be an int >= 1, got {window!r}")
    return Mask(causal=True, window=window)


def spans(span_ids: Tensor) -> Mask:
    """Bidirectional spans inside causal attention: span_ids (B, S) or (S,), -1 outside any span."""
    if not isinstance(span_ids, Tensor) or span_ids.dim() not in (1, 2) or span_ids.is_floating_point() \
            or span_ids.dtype == torch.bool:
        raise ValueError("vlfast.masks.spans: span_ids must be an integer tensor (B, S) or (S,), -1 outside spans, "
                         f"got {getattr(span_ids, 'dtype', type(span_ids).__name__)} "
                         f"{tuple(getattr(span_ids, 'shape', ()))}")
    return Mask(causal=True, span_ids=span_ids.to(torch.int32).contiguous())


def image_prefix(num_image_tokens: int, seq_len: int, batch: Optional[int] = None, device=None) -> Mask:
    """LLaVA: the first `num_image_tokens` tokens see each other; the text after them is causal.
    0 <= num_image_tokens <= seq_len."""
    if not _is_int(seq_len) or seq_len < 0:
        raise ValueError(f"vlfast.masks.image_prefix: seq_len must be an int >= 0, got {seq_len!r}")
    if not _is_int(num_image_tokens) or not 0 <= num_image_tokens <= seq_len:
        raise ValueError(f"vlfast.masks.image_prefix: num_image_tokens must be an int in [0, seq_len={seq_len}], "
                         f"got {num_image_tokens!r}")
    if batch is not None and (not _is_int(batch) or batch < 1):
        raise ValueError(f"vlfast.masks.image_prefix: batch must be None or an int >= 1, got {batch!r}")
    ids = torch.full((seq_len,), -1, dtype=torch.int32, device=device)
    ids[:num_image_tokens] = 0
    return spans(ids if batch is None else ids.expand(batch, seq_len))


def dalle(text_len: int, rows: int, cols: int, kind: str, kernel: int = 11) -> Mask:
    """DALL-E's row / column / convolutional sparse attention over text + an image grid."""
    for name, value in (("text_len", text_len), ("rows", rows), ("cols", cols), ("kernel", kernel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "text_len" else 1):
            raise ValueError(f"vlfast.masks.dalle: {name} must be a non-negative int (>= 1 for rows, cols, "
                             f"kernel), got {value!r}")
    if kind not in DALLE_KINDS:
        raise ValueError(f"vlfast.masks.dalle: kind must be one of {tuple(DALLE_KINDS)}, got {kind!r}")
    return Mask(causal=True, dalle=(text_len, rows, cols, DALLE_KINDS[kind], kernel))


def key_padding(valid: Tensor) -> Mask:
    """Keys with valid[b, j] False are never attended; valid (B, Sk) bool."""
    if not isinstance(valid, Tensor) or valid.dtype != torch.bool or valid.dim() != 2:
        raise ValueError("vlfast.masks.key_padding: valid must be a (B, Sk) bool tensor, got "
                         f"{getattr(valid, 'dtype', type(valid).__name__)} {tuple(getattr(valid, 'shape', ()))}")
    return Mask(key_valid=valid.contiguous())


def _from_lengths(lengths: Tensor, sk: int) -> Mask:
    """Right padding: the first lengths[b] keys of each batch are valid; lengths (B,) int in [0, sk]."""
    if not _is_int(sk) or sk < 0:
        raise ValueError(f"vlfast.masks.key_padding.from_lengths: sk must be an int >= 0, got {sk!r}")
    if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.is_floating_point() \
            or lengths.is_complex() or lengths.dtype == torch.bool:
        raise TypeError("vlfast.masks.key_padding.from_lengths: lengths must be an integer tensor (B,), got "
                        f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
    if lengths.numel():
        low, high = (int(x) for x in torch.stack([lengths.min(), lengths.max()]).tolist())  # one host sync
        if low < 0 or high > sk:
            raise ValueError(f"vlfast.masks.key_padding.from_lengths: lengths must be in [0, {sk}], "
                             f"got values from {low} to {high}")
    return key_padding(torch.arange(sk, device=lengths.device)[None, :] < lengths[:, None])


key_padding.from_lengths = _from_lengths
