"""Decode attention from PyTorch's own kernels: impl="torch", the CPU path (reference.py is the math).

The whole batch in one call of PyTorch's fused CPU flash-attention kernel: the cache rows up to the
longest L_b (a view of a contiguous cache, one gather of a paged one), the GQA group's queries stacked
as rows of their KV head (so each key and value is read once per KV head), the mask and the lengths as
one additive (B, 1, G Sq, L) bias. Accumulation is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

from ... import _workspace
from ...masks import Mask
from ..attention.torch_impl import _FLASH
from ..mask_cache import MaskCache
from .reference import capacity, compute_dtype

# Gather the kept keys when fewer than this fraction of them are kept (the copy costs a fraction of a pass).
SKIP_BELOW = 0.75
# A mask that keeps the same pairs in every row gets its (S_max, S_max) bias built once, up to this S_max.
PATTERN_MAX_POSITIONS = 2048
# A decode step gathers the keys its mask keeps out of a span of at least this many (below it the two
# gathers cost more than the masked keys: DALL-E sampling over 96 tokens, 92 -> 98 ms).
GATHER_MIN_KEYS = 256
# (position, length) pairs whose kept keys a Pattern holds as index tensors.
KEPT_KEYS_CACHED = 8
# A step's one query whose kept keys form at most this many arithmetic runs (DALL-E's row layer: the text,
# then its row; the column layer: the text, then every grid-th key) attends to each run as a view of the
# cache, one kernel call each, merged by their lse: no copy. 2 x 16 heads x 1280 keys, D 64, 288 kept:
# 0.11-0.12 ms against 0.34-0.36 for the gather and its call (0.16 of it the gather). More runs (the conv
# layer's rows) are gathered into one call.
MAX_KEY_RUNS = 4
# A paged cache's gathered rows are kept between calls (vlfast._workspace) up to this size per tensor:
# a fresh gather of several MiB faulted its pages in on every step.
WORKSPACE_MAX_BYTES = 64 << 20
_PATTERNS = MaskCache(limit=16)


@dataclass
class Pattern:
    """A batch-wide mask over cache positions 0 .. S_max - 1: the additive bias, and per query position
    its first kept key, one past its last, and how many it keeps (host lists: a step reads them without
    a device op)."""
    bias: Tensor        # (S_max, S_max) in q's dtype: 0 kept, -inf not
    first: list         # S_max where a query keeps no key
    end: list
    count: list
    kept: dict = field(default_factory=dict)  # (position, length) -> (kept keys (int64), their runs), the last few

    def kept_keys(self, position: int, length: int) -> tuple[Tensor, list]:
        """The cache positions below `length` that the query at `position` keeps, ascending, and the same as
        arithmetic runs [(start, stop, step)] (cached for the last KEPT_KEYS_CACHED (position, length)
        pairs: a generation step asks for the next)."""
        key = (position, length)
        found = self.kept.get(key)
        if found is None:
            cols = (self.bias[position, :length] == 0).nonzero()[:, 0]
            found = cols, arithmetic_runs(cols.tolist())
            if len(self.kept) >= KEPT_KEYS_CACHED:
                self.kept.pop(next(iter(self.kept)))
            self.kept[key] = found
        return found


def arithmetic_runs(cols: list) -> list:
    """Ascending positions as maximal runs of one step, taken greedily from the first:
    [0, 1, 2, 9, 13, 17] -> [(0, 3, 1), (9, 18, 4)], each run the slice start:stop:step."""
    runs, i = [], 0
    while i < len(cols):
        j = i + 1
        step = cols[j] - cols[i] if j < len(cols) else 1
        while j + 1 < len(cols) and cols[j + 1] - cols[j] == step:
            j += 1
        last = min(j, len(cols) - 1)
        runs.append((cols[i], cols[last] + 1, step))
        i = last + 1
    return runs


def pattern(mask: Mask, s_max: int, dtype: torch.dtype, device) -> Pattern:
    """The mask's Pattern over a cache of s_max positions (mask.batch_size() must be None), cached."""
    def compute() -> Pattern:
        pos = torch.arange(s_max, device=device)
        keep = mask.allowed(pos[:, None], pos[None, :])  # (S_max, S_max)
        bias = torch.full(keep.shape, float("-inf"), dtype=dtype, device=device).masked_fill_(keep, 0.0)
        count = keep.sum(dim=1)
        kept = count > 0
        first = torch.where(kept, keep.byte().argmax(dim=1), s_max)
        end = torch.where(kept, s_max - keep.flip(1).byte().argmax(dim=1), 0)
        return Pattern(bias, first.tolist(), end.tolist(), count.tolist())
    return _PATTERNS.get(mask, (s_max, dtype, str(device)), compute)


def _dense_rows(cache: Tensor, block_table: Optional[Tensor], longest: int, name: str) -> Tensor:
    """(B, Hkv, longest, D): every row's first `longest` cache positions (past L_b: whatever is there).
    A paged cache is gathered into the scratch buffer `name` (vlfast._workspace, up to
    WORKSPACE_MAX_BYTES; a fresh tensor past it): the caller must be done with it before the next call."""
    if block_table is None:
        return cache if longest == cache.shape[2] else cache[:, :, :longest]
    _, hkv, page, d = cache.shape
    pages = block_table[:, : -(-longest // page)].reshape(-1)  # (B n,)
    b, n = block_table.shape[0], pages.numel() // max(block_table.shape[0], 1)
    numel = hkv * pages.numel() * page * d
    rows = _workspace.buffer(name, numel, cache.dtype, cache.device) \
        if numel * cache.element_size() <= WORKSPACE_MAX_BYTES else cache.new_empty(numel)
    rows = rows.view(hkv, b * n, page, d)
    # one copy straight into the (Hkv, B, L, D) layout: a head's pages are contiguous page x D blocks
    # (twice as fast as gathering whole pages and then permuting them into rows)
    for h in range(hkv):
        torch.index_select(cache[:, h], 0, pages, out=rows[h])
    return rows.view(hkv, b, n * page, d).permute(1, 0, 2, 3)[:, :, :longest]


def _matmul_softmax(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], scale: float):
    """(out, natural lse) as _FLASH gives them, from two batched GEMMs (devices without that kernel)."""
    ct = compute_dtype(q.dtype)
    scores = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)).mul_(scale)
    if attn_mask is not None:
        scores.add_(attn_mask)
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = scores.sub_(lse).exp_().masked_fill_(lse == float("-inf"), 0.0)  # NaN inputs stay NaN
    return torch.matmul(p, v.to(ct)).to(q.dtype), lse[..., 0]


def _plain(mask: Optional[Mask]) -> bool:
    """No mask, or a causal one alone: row b's query i keeps the keys up to its position L_b - Sq + i."""
    return mask is None or (mask.causal and mask.window is None and mask.span_ids is None and mask.dalle is None
                            and mask.key_valid is None)


def _keep(mask: Optional[Mask], lengths: Tensor, sq: int, group: int, longest: int,
          uniform: bool) -> Optional[Tensor]:
    """(B or 1, G Sq or 1, L) bool: the pairs kept, or None when every pair of the (B, L) rows is. With one
    length for every row and no per-row mask part, one (1, ., L) matrix serves the batch."""
    if _plain(mask) and (mask is None or sq == 1) and uniform:  # every key below L_b, and L_b the same
        return None
    device = lengths.device
    p_k = torch.arange(longest, device=device)
    if _plain(mask) and (mask is None or sq == 1):
        return (p_k < lengths[:, None])[:, None, :]
    if uniform and _plain(mask):
        p_q = (torch.arange(group * sq, device=device) % sq)[None, :, None] + (longest - sq)
        return p_k <= p_q
    if uniform and mask.batch_size() is None:  # every row keeps the same pairs
        lengths = lengths[:1]
    lengths = lengths.long()[:, None, None]
    p_q = (torch.arange(group * sq, device=device) % sq)[None, :, None] + (lengths - sq)  # (B, G Sq, 1)
    keep = p_k < lengths
    batch = torch.arange(lengths.shape[0], device=device)[:, None, None] if mask.batch_size() else None
    return keep & mask.allowed(p_q, p_k, batch)


def _keeps_a_key(mask: Optional[Mask], shortest: int, sq: int) -> bool:
    """True when every query is sure to keep a key: its own position, which is >= 0 once L_b >= Sq, under
    no mask, causal, a window or spans (DALL-E's layers and key padding can rule every key out)."""
    return shortest >= max(sq, 1) and (mask is None or (mask.dalle is None and mask.key_valid is None))


def bounds_of(lengths: Tensor) -> tuple[int, int]:
    """(shortest, longest) of lengths (B,): one host read (a list on a CPU, where that is cheapest)."""
    if lengths.numel() == 0:
        return 0, 0
    if lengths.device.type == "cpu":
        values = lengths.tolist()
        return min(values), max(values)
    return tuple(int(x) for x in torch.stack([lengths.min(), lengths.max()]).tolist())


def forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, block_table: Optional[Tensor],
            mask: Optional[Mask], scale: float, bounds: Optional[tuple[int, int]] = None,
            finite_tail: bool = False) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Sq, D) in q's dtype, lse (B, Hq, Sq) in the compute dtype); lengths (B,) = L_b;
    bounds: (shortest, longest) L_b when the caller has read them already; finite_tail: the caller
    guarantees finite values in every slot past a row's length (none is copied to zero it)."""
    b, hq, sq, d = q.shape
    ct = compute_dtype(q.dtype)
    shortest, longest = bounds_of(lengths) if bounds is None else bounds
    if longest == 0:  # no keys anywhere
        return torch.zeros_like(q), torch.full((b, hq, sq), float("-inf"), dtype=ct, device=q.device)
    k = _dense_rows(k_cache, block_table, longest, "attention_decode.k_rows")
    v = _dense_rows(v_cache, block_table, longest, "attention_decode.v_rows")
    hkv = k.shape[1]
    group = hq // hkv
    uniform = shortest == longest
    s_max = capacity(k_cache, block_table)
    batch_wide = not _plain(mask) and mask.batch_size() is None
    if uniform and longest >= sq and batch_wide and s_max <= PATTERN_MAX_POSITIONS:
        pat = pattern(mask, s_max, q.dtype, q.device)
        if all(pat.first[p] < longest for p in range(longest - sq, longest)):  # every query keeps a key
            return _forward_pattern(q, k, v, pat, longest, scale)
    if not uniform and not finite_tail:
        # Slots past a row's length hold whatever the cache held (NaN in a fresh torch.empty); a
        # masked score still multiplies its value by 0, so they are zeroed (in the gathered copy of
        # a paged cache; a copy of a contiguous one).
        past = (torch.arange(longest, device=q.device) >= lengths[:, None])[:, None, :, None]  # (B, 1, L, 1)
        k, v = (x.masked_fill_(past, 0) if block_table is not None else x.masked_fill(past, 0) for x in (k, v))
    keep = _keep(mask, lengths, sq, group, longest, uniform)
    if keep is not None and keep.shape[0] == 1:
        # One pattern for the batch (DALL-E's sparse layers, windows): read only the keys some query keeps.
        cols = keep[0].any(dim=0).nonzero()[:, 0]
        if cols.numel() < SKIP_BELOW * longest:
            k, v, keep = k.index_select(2, cols), v.index_select(2, cols), keep[:, :, cols]
            keep = None if bool(keep.all()) else keep
    # -inf where a pair is ruled out: (B or 1, 1, G Sq or 1, L), broadcast over the KV heads
    bias = None if keep is None else \
        torch.full(keep.shape, float("-inf"), dtype=q.dtype, device=q.device).masked_fill_(keep, 0.0)[:, None]
    out, lse = _grouped(q, k, v, bias, scale)
    if keep is not None and not _keeps_a_key(mask, shortest, sq):
        empty = ~keep.any(dim=-1)[:, None]  # (B or 1, 1, G Sq or 1): rows that keep no key give 0, lse -inf
        out = out.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return _ungrouped(out, lse, q.shape)


def _ungrouped(out: Tensor, lse: Tensor, shape) -> tuple[Tensor, Tensor]:
    """_grouped's (out, lse) in q's (B, Hq, Sq, D) / (B, Hq, Sq) shapes."""
    if out.shape == shape:
        return out, lse
    return out.reshape(shape), lse.reshape(shape[:3])


def _grouped(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, Hkv, G Sq, D), lse (B, Hkv, G Sq) in the compute dtype) of q (B, Hq, Sq, D) against k / v
    (B, Hkv, L, D) in one kernel call: a KV head's group of query heads stacked as its rows. No op is
    spent where G = 1 (each small op after the kernel cost ~5-10 us here, its caches cold)."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    qg = q if hq == hkv else q.reshape(b, hkv, hq // hkv * sq, d)
    out, lse = (_FLASH if q.device.type == "cpu" else _matmul_softmax)(qg, k, v, attn_mask=bias, scale=scale)
    ct = compute_dtype(q.dtype)
    return out, lse if lse.dtype == ct else lse.to(ct)


def _runs_forward(q: Tensor, k: Tensor, v: Tensor, runs: list, scale: float) -> tuple[Tensor, Tensor]:
    """_grouped's (out, lse) over the keys of `runs` [(start, stop, step)], each non-empty: one call per run on
    views of k / v, the outputs merged in the compute dtype by the runs' lse."""
    out = lse = None
    for start, stop, step in runs:
        o, l = _grouped(q, k[:, :, start:stop:step], v[:, :, start:stop:step], None, scale)
        if out is None:
            out, lse = o.to(l.dtype), l
            continue
        new = torch.logaddexp(lse, l)
        out = out.mul_(torch.exp(lse - new).unsqueeze_(-1)).addcmul_(o.to(l.dtype), torch.exp(l - new).unsqueeze_(-1))
        lse = new
    return out.to(q.dtype), lse


def _forward_pattern(q: Tensor, k: Tensor, v: Tensor, pat: Pattern, length: int,
                     scale: float) -> tuple[Tensor, Tensor]:
    """forward for rows that all hold `length` keys, k / v (B, Hkv, length, D), under a batch-wide mask
    under which every query keeps a key: its bias rows sliced from the Pattern, and the keys read only
    from the first any query keeps to one past the last (a view)."""
    hq, sq = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    group = hq // hkv
    rows = range(length - sq, length)  # the queries' positions; each keeps a key below length
    lo = min(pat.first[p] for p in rows)
    hi = min(max(pat.end[p] for p in rows), length)
    whole = all(pat.first[p] == lo and pat.end[p] == hi and pat.count[p] == hi - lo for p in rows)
    bias = None
    if not whole and sq == 1 and hi - lo >= GATHER_MIN_KEYS and pat.count[length - 1] < SKIP_BELOW * (hi - lo):
        # one query keeping few of the keys in its span (DALL-E's layers): read only those
        cols, runs = pat.kept_keys(length - 1, length)
        if len(runs) <= MAX_KEY_RUNS:
            return _ungrouped(*_runs_forward(q, k, v, runs, scale), q.shape)
        return _ungrouped(*_grouped(q, k.index_select(2, cols), v.index_select(2, cols), None, scale), q.shape)
    if not whole:
        bias = pat.bias[length - sq:length, lo:hi]  # (Sq, keys): a view
        bias = (bias.repeat(group, 1) if group > 1 and sq > 1 else bias)[None, None]
    if hi - lo != k.shape[2]:
        k, v = k[:, :, lo:hi], v[:, :, lo:hi]
    return _ungrouped(*_grouped(q, k, v, bias, scale), q.shape)
