"""Block maps: which key blocks each query block must visit, and which of them the mask keeps whole.

For masks whose kept pairs follow per-token data or patterns (spans, DALL-E, key padding), the kernels
iterate over lists built here instead of bounds: status[b, qb, kb] is 0 (no pair kept: skipped),
1 (every in-range pair kept: no mask evaluation) or 2 (a boundary block: the kernel evaluates the
mask). The lists come in both orders: per query block (forward, dQ) and per key block (dK, dV).
Built in PyTorch on the inputs' device, one query block at a time (memory B x BM x Sk), and cached
per mask and shape: a model reuses one mask object across its layers and the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...masks import Mask
from ..mask_cache import MaskCache

_MAPS = MaskCache()


@dataclass
class BlockLists:
    """Per row block: the column blocks to visit (ascending, count first entries valid) and full flags."""
    index: Tensor   # (B', rows, cols) int32
    full: Tensor    # (B', rows, cols) int8
    count: Tensor   # (B', rows) int32


@dataclass
class BlockMap:
    by_query: BlockLists  # rows = query blocks, cols = key blocks
    by_key: BlockLists    # rows = key blocks, cols = query blocks
    per_batch: bool


def needs_map(mask: Optional[Mask]) -> bool:
    """Masks the kernels cannot bound by arithmetic alone."""
    return mask is not None and (mask.span_ids is not None or mask.dalle is not None or mask.key_valid is not None)


def _lists(status: Tensor) -> BlockLists:
    kept = status != 0
    # a stable sort puts the kept blocks first, in ascending order
    order = torch.sort((~kept).to(torch.int8), dim=-1, stable=True).indices
    return BlockLists(order.to(torch.int32).contiguous(),
                      (torch.gather(status, -1, order) == 1).to(torch.int8).contiguous(),
                      kept.sum(dim=-1, dtype=torch.int32).contiguous())


def _status(mask: Mask, sq: int, sk: int, bm: int, bn: int, device, q_len: Optional[Tensor] = None,
            k_len: Optional[Tensor] = None, positions: Optional[Tensor] = None) -> Tensor:
    """(B', nQ, nK) int8. q_len / k_len (B,) give per-sequence lengths (packed layout); else Sq, Sk.
    positions (S,): the sequence position of each token of a permuted layout (Sq == Sk)."""
    n_q, n_k = -(-sq // bm), -(-sk // bn)
    b = mask.batch_size() or (q_len.shape[0] if q_len is not None else 1)
    status = torch.empty(b, n_q, n_k, dtype=torch.int8, device=device)
    bidx = torch.arange(b, device=device)[:, None, None]
    cols = torch.arange(n_k * bn, device=device)
    ql = q_len[:, None, None] if q_len is not None else torch.full((1, 1, 1), sq, device=device)
    kl = k_len[:, None, None] if k_len is not None else torch.full((1, 1, 1), sk, device=device)
    for qb in range(n_q):
        rows = torch.arange(qb * bm, (qb + 1) * bm, device=device)
        p_q = rows[None, :, None] + (kl - ql)
        p_k = cols[None, None, :].clamp(max=sk - 1)
        if positions is not None:
            p_q, p_k = positions[p_q.clamp(max=sk - 1)], positions[p_k]
        in_range = (rows[None, :, None] < ql) & (cols[None, None, :] < kl)
        keep = mask.allowed(p_q, p_k, bidx) & in_range
        keep = keep.view(b, bm, n_k, bn)
        in_range = in_range.expand(b, bm, n_k * bn).reshape(b, bm, n_k, bn)
        any_kept = keep.any(dim=3).any(dim=1)
        all_kept = (keep | ~in_range).all(dim=3).all(dim=1)
        status[:, qb] = torch.where(any_kept, torch.where(all_kept, 1, 2), 0).to(torch.int8)
    return status


def block_map(mask: Mask, sq: int, sk: int, bm: int, bn: int, device,
              positions: Optional[Tensor] = None) -> BlockMap:
    """The block map of `mask` for the dense layout, cached per mask contents and shape. positions:
    see _status (a permuted layout is a function of the mask and shape, so it is not a cache key)."""
    def compute() -> BlockMap:
        status = _status(mask, sq, sk, bm, bn, device, positions=positions)
        return BlockMap(_lists(status), _lists(status.transpose(1, 2).contiguous()), mask.batch_size() is not None)
    return _MAPS.get(mask, (sq, sk, bm, bn, str(device), positions is not None), compute)
    status = _status(mask, sq, sk, bm, bn, device, positions=positions)
    value = BlockMap(_lists(status), _lists(status.transpose(1, 2).contiguous()), mask.batch_size() is not None)
    if len(_CACHE) >= _CACHE_LIMIT:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = ([weakref.ref(t) for t in (mask.span_ids, mask.key_valid) if t is not None], value)
    return value


def block_map_varlen(mask: Mask, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, bm: int, bn: int) -> BlockMap:
    """The block map for packed sequences (per sequence; span ids packed by token)."""
    q_len = (cu_q[1:] - cu_q[:-1]).long()
    k_len = (cu_k[1:] - cu_k[:-1]).long()
    per_seq = mask
    if mask.span_ids is not None:  # packed (T,) ids -> (B, max_k) padded with -1
        pos = cu_k[:-1, None].long() + torch.arange(max_k, device=cu_k.device)[None, :]
        ok = torch.arange(max_k, device=cu_k.device)[None, :] < k_len[:, None]
        padded = torch.where(ok, mask.span_ids[pos.clamp(max=mask.span_ids.shape[0] - 1)], -1)
        per_seq = Mask(causal=mask.causal, window=mask.window, span_ids=padded.to(torch.int32), dalle=mask.dalle)
    status = _status(per_seq, max_q, max_k, bm, bn, cu_q.device, q_len, k_len)
    return BlockMap(_lists(status), _lists(status.transpose(1, 2).contiguous()), True)
