"""Decode attention in plain PyTorch: the specification.

One step of generation: Sq new queries per sequence attend to that sequence's KV cache.
  L_b = cache_seqlens[b] (+ the S_new appended tokens)   keys 0 .. L_b - 1 of row b
  query i of Sq sits at position L_b - Sq + i            (the last Sq positions, as vlfast.attention)
  out[b, h, i] = sum_j softmax_j(scale * <q_bhi, k_bgj> over the kept j) v_bgj,   g = h // (Hq / Hkv)
  lse[b, h, i] = log sum_j exp(scale * <q_bhi, k_bgj>) over the kept j (natural log; -inf when none)
A pair is kept when j < L_b and the mask keeps (position of i, j) (vlfast.masks, positions in cache
coordinates); a query that keeps no key gets 0.

Caches: contiguous (B, Hkv, S_max, D), or paged (num_pages, Hkv, page, D) with block_table (B, max_pages):
position p of row b lives in page block_table[b, p // page], slot p % page.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...masks import Mask


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def capacity(k_cache: Tensor, block_table: Optional[Tensor]) -> int:
    """Positions a row of the cache holds: S_max, or max_pages x page for a paged cache."""
    return k_cache.shape[2] if block_table is None else block_table.shape[1] * k_cache.shape[2]


def cache_rows(cache: Tensor, b: int, length: int, block_table: Optional[Tensor]) -> Tensor:
    """Row b's first `length` keys (or values) as (Hkv, length, D)."""
    if block_table is None:
        return cache[b, :, :length]
    page = cache.shape[2]
    pages = block_table[b, : -(-length // page)].long()
    return cache[pages].permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, block_table: Optional[Tensor],
            mask: Optional[Mask], scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq) in the compute dtype); lengths (B,) = L_b."""
    b_size, hq, sq, _ = q.shape
    ct = compute_dtype(q.dtype)
    out = torch.zeros(q.shape, dtype=ct, device=q.device)
    lse = torch.full((b_size, hq, sq), float("-inf"), dtype=ct, device=q.device)
    for b, length in enumerate(lengths.tolist()):
        k = cache_rows(k_cache, b, length, block_table).to(ct)
        v = cache_rows(v_cache, b, length, block_table).to(ct)
        group = hq // k.shape[0]
        k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # (Hq, L, D)
        scores = scale * q[b].to(ct) @ k.transpose(-1, -2)  # (Hq, Sq, L)
        if mask is not None:
            p_q = torch.arange(sq, device=q.device)[:, None] + (length - sq)
            p_k = torch.arange(length, device=q.device)[None, :]
            batch = torch.tensor(b, device=q.device) if mask.batch_size() else None
            scores = scores.masked_fill(~mask.allowed(p_q, p_k, batch), float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # -inf where a row keeps nothing (or L = 0)
        kept = row_lse != float("-inf")  # NaN inputs stay NaN
        p = torch.where(kept[..., None], torch.exp(scores - row_lse[..., None]), 0.0)
        out[b] = p @ v
        lse[b] = row_lse
    return out.to(q.dtype), lse
