"""Attention from PyTorch's own CPU flash kernel, with work the mask rules out skipped.

The mask is split into tiles: a tile is a (query view, key view) pair that PyTorch's CPU flash
attention (aten._scaled_dot_product_flash_attention_for_cpu, the kernel behind F.scaled_dot_product_
attention on a CPU) runs in one call, with no mask, with is_causal (top-left aligned) or with an
additive mask of the tile's size. Queries that several tiles visit are merged by their log-sum-exp;
the backward runs the kernel's backward per tile with the merged out and lse (its softmax is then the
whole row's), summing dq over a query's tiles and dk / dv over a key's.

  no mask; causal, Sq == Sk   one call, no mask / is_causal (what SDPA runs)
  up to DENSE_MAX_PAIRS, and  one call with the whole additive mask (what SDPA with a dense mask runs)
  bf16 / fp16 but DALL-E
  DALL-E row / column         text queries: causal over text; image queries: all text keys, then each
                              image row against its own row, causal (grid views: rows as heads; column
                              layers permute the grid column-major first)
  one span at the start       the prefix against itself; the text after it against the prefix, then
                              itself causally (merged)
  every other mask            blocks of queries, each against the runs of key blocks the block map
                              keeps, with an additive mask where a run is not kept whole
Plans other than the first are cached per mask and shape (a model reuses one mask across layers).

Inputs with a NaN or inf take the reference (the CPU kernel drops NaN scores in float32 / bfloat16).
On other devices the reference's chunked code runs. Gradients come back in the kernel's own layout,
(B, S, H, D) in memory, which the op's fake kernel states for impl="torch" (no copies).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ...masks import DALLE_KINDS, Mask
from . import reference as _reference
from ..mask_cache import MaskCache
from .blocks import _status

LOG2E = 1.4426950408889634
BLOCK = 128  # queries / keys per block of the generic plan
# Up to this many (query, key) pairs a mask runs as one call with a dense additive mask, as SDPA
# would: there the kernel's fixed cost per call and per head outweighs the pairs that tiles skip
# (2 cores, torch 2.13, fwd / bwd ms dense vs tiled: DALL-E row 4x320x320 fp32 0.54 / 1.33 vs
# 0.84 / 1.12, bf16 0.29 / 1.78 vs 0.82 / 4.74; image prefix 4x505x505 fp32 even; DALL-E row
# 8x1280x1280 fp32 15.6 / 36.3 vs 5.9 / 12.8, bf16 9.4 / 40.0 vs 5.2 / 29.7).
DENSE_MAX_PAIRS = 640 * 640
# The kernel through its C++ binding where this torch has one: ~2 us a call less than torch.ops' Python
# packet (the backward has no such binding)
_FLASH = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None) or \
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_PLANS = MaskCache()


@dataclass
class View:
    """Where a tile's tokens sit in a (B, H, S, ...) tensor: a slice of S, or a grid of `rows` x
    `cols` tokens from `start` with the rows folded into the head axis ((B*H, rows, cols, ...))."""
    start: int
    stop: int
    cols: int = 0  # 0: a plain slice

    def of(self, x: Tensor) -> Tensor:
        if not self.cols:
            whole = self.start == 0 and self.stop == x.shape[2]  # no slicing: it costs microseconds
            return x if whole else x[:, :, self.start:self.stop]
        return x.flatten(0, 1)[:, self.start:self.stop].unflatten(1, (-1, self.cols))


@dataclass
class Tile:
    q: View
    k: View
    causal: bool = False                 # top-left aligned over the tile
    bias: Optional[Tensor] = None        # (B' , 1, q, k) additive mask in the inputs' dtype
    empty: Optional[Tensor] = None       # (B', 1, q) bool: rows that keep no key of this tile


@dataclass
class Plan:
    tiles: list
    empty: Optional[Tensor]              # (B', 1, Sq) bool: rows that keep no key at all, or None
    perm: Optional[Tensor] = None        # column-major token order (DALL-E column layers)
    disjoint: bool = False               # every query in at most one tile: no merging


# --- plans -------------------------------------------------------------------------------------------

def _dalle_grid(mask: Mask, sq: int, sk: int):
    """(text_len, rows, cols, kind) when the mask is exactly a DALL-E row / column layer over the
    whole sequence, else None."""
    if mask.dalle is None or mask.span_ids is not None or mask.key_valid is not None or mask.window is not None:
        return None
    t, rows, cols, kind, _ = mask.dalle
    if kind == DALLE_KINDS["conv"] or sq != sk or sk != t + rows * cols:
        return None
    return t, rows, cols, kind


def _grid_plan(t: int, rows: int, cols: int, kind: int, s: int, device) -> Plan:
    """Text queries causal over text; image queries against all text keys, and each image row (in
    grid order) against its own row, causal (rows as heads); the two merge by log-sum-exp."""
    perm = None
    if kind == DALLE_KINDS["column"]:  # columns become rows: column-major image tokens
        grid = torch.arange(rows * cols, device=device).view(rows, cols).T.reshape(-1)
        perm = torch.cat([torch.arange(t, device=device), t + grid])
        rows, cols = cols, rows
    tiles = [Tile(View(0, t), View(0, t), causal=True), Tile(View(t, s), View(0, t))] if t else []
    tiles.append(Tile(View(t, s, cols), View(t, s, cols), causal=True))
    return Plan(tiles, None, perm, disjoint=not t)


def _prefix_len(mask: Mask, sq: int, sk: int) -> Optional[int]:
    """P when the mask is exactly causal with one bidirectional span over the first P tokens
    (LLaVA's image prefix; span ids (S,) shared by the batch), else None."""
    ids = mask.span_ids
    if (ids is None or ids.dim() != 1 or sq != sk or mask.dalle is not None or mask.key_valid is not None
            or mask.window is not None):
        return None
    p = int((ids >= 0).sum())
    if p == 0 or not bool((ids[:p] == ids[0]).all()) or bool((ids[p:] >= 0).any()):
        return None
    return p


def _prefix_plan(p: int, s: int) -> Plan:
    """The prefix sees itself whole; the text after it sees the prefix whole and itself causally."""
    tiles = [Tile(View(0, p), View(0, p))]
    if p < s:
        tiles += [Tile(View(p, s), View(0, p)), Tile(View(p, s), View(p, s), causal=True)]
    return Plan(tiles, None, disjoint=p == s)


def _runs(kept: list) -> list:
    """[(first, last + 1)] of consecutive True entries."""
    runs, start = [], None
    for i, k in enumerate(kept + [False]):
        if k and start is None:
            start = i
        elif not k and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _block_plan(mask: Mask, sq: int, sk: int, dtype, device) -> Plan:
    """Blocks of queries against the runs of key blocks the block map keeps."""
    status = _status(mask, sq, sk, BLOCK, BLOCK, device)  # (B', nQ, nK): 0 skipped, 1 whole, 2 partial
    any_kept = (status != 0).any(dim=0).tolist()
    all_whole = (status == 1).all(dim=0).tolist()
    keep = _reference._kept(mask, 0, sq, sq, sk, 1, device)  # (B', Sq, Sk) bool
    if keep.shape[0] != status.shape[0]:
        keep = keep.expand(status.shape[0], sq, sk)
    tiles = []
    for qb, kept in enumerate(any_kept):
        q0, q1 = qb * BLOCK, min(sq, (qb + 1) * BLOCK)
        for kb0, kb1 in _runs(kept):
            k0, k1 = kb0 * BLOCK, min(sk, kb1 * BLOCK)
            tile = Tile(View(q0, q1), View(k0, k1))
            if not all(all_whole[qb][kb0:kb1]):
                part = keep[:, q0:q1, k0:k1]
                tile.bias = _bias(part, dtype)
                empty = ~part.any(dim=-1)
                tile.empty = empty[:, None] if bool(empty.any()) else None
            tiles.append(tile)
    empty = ~keep.any(dim=-1)
    disjoint = all(len(_runs(kept)) <= 1 for kept in any_kept)
    return Plan(tiles, empty[:, None] if bool(empty.any()) else None, disjoint=disjoint)


def _bias(keep: Tensor, dtype) -> Tensor:
    """(B', q, k) bool -> (B', 1, q, k) additive mask (0 kept, -inf not) in the inputs' dtype."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, float("-inf"))[:, None]


def _dense_plan(mask: Mask, sq: int, sk: int, dtype, device) -> Plan:
    keep = _reference._kept(mask, 0, sq, sq, sk, 1, device)  # (B', Sq, Sk)
    empty = ~keep.any(dim=-1)
    return Plan([Tile(View(0, sq), View(0, sk), bias=_bias(keep, dtype))],
                empty[:, None] if bool(empty.any()) else None, disjoint=True)


@functools.lru_cache(maxsize=256)
def _one_call_plan(causal: bool, sq: int, sk: int) -> Plan:
    """No mask, or causal with Sq == Sk: one call, no additive mask."""
    return Plan([Tile(View(0, sq), View(0, sk), causal=causal)], None)


def _plan(mask: Optional[Mask], sq: int, sk: int, dtype, device) -> Plan:
    if mask is None:
        return _one_call_plan(False, sq, sk)
    if (mask.causal and sq == sk and mask.window is None and mask.span_ids is None and mask.dalle is None
            and mask.key_valid is None):
        return _one_call_plan(True, sq, sk)
    return _PLANS.get(mask, (sq, sk, dtype, str(device)), lambda: _new_plan(mask, sq, sk, dtype, device))


def _new_plan(mask: Mask, sq: int, sk: int, dtype, device) -> Plan:
    grid = _dalle_grid(mask, sq, sk)
    # In bfloat16 / float16 the kernel's backward runs split tiles slower than one dense call (image
    # prefix 8x1060x1060, P=576: three tiles 26 ms vs dense 21.6 ms; float32: 26 vs 34 ms); the
    # DALL-E grid plan still wins there (8x1280: 22.4 vs 29.3 ms).
    dense = sq * sk <= DENSE_MAX_PAIRS or (grid is None and dtype in (torch.bfloat16, torch.float16))
    prefix = _prefix_len(mask, sq, sk) if not dense else None
    if dense:
        return _dense_plan(mask, sq, sk, dtype, device)
    if grid is not None:
        return _grid_plan(*grid, sk, device)
    if prefix is not None:
        return _prefix_plan(prefix, sk)
    return _block_plan(mask, sq, sk, dtype, device)


# --- forward and backward over a plan ----------------------------------------------------------------

def _elements(x: Tensor) -> Optional[Tensor]:
    """x's distinct elements as a 1-D view (in memory order, broadcast dimensions dropped), or None
    when they are not one dense block. Worked out from the strides in Python: a chain of select /
    permute calls cost ~8 us for autograd's expanded gradient of a sum."""
    if x.is_contiguous():
        return x.view(-1)
    dims = sorted(((st, n) for st, n in zip(x.stride(), x.shape) if st and n != 1), reverse=True)
    count = 1
    for st, n in reversed(dims):  # innermost first: each stride must be the product of the sizes inside it
        if st != count:
            return None
        count *= n
    return x.as_strided((count,), (1,))


def _finite(*xs: Tensor) -> bool:
    """False when any of xs holds a NaN or inf. One pass over each: float32 / float64 elements go to
    BLAS's dot product with themselves (MKL's, through torch.vdot), whose sum of squares is NaN or inf
    when an element is (a finite sum that overflows, |x| ~ 1e19 in float32, only sends the call to the
    reference). On 2 cores it read 512 KB in ~7 us on one thread, where numpy's einsum sum took ~25 (in
    a call after the attention kernel: +22 us against +38), and 3 MB in 22 us on the pool's two threads
    against 67. float16 / bfloat16 (no BLAS dot product: 4 ms) and scattered tensors are summed by
    PyTorch."""
    total = 0.0
    for x in _one_base(xs) or xs:
        flat = _elements(x) if x.dtype in (torch.float32, torch.float64) else None
        if flat is None:
            total += x.sum(dtype=torch.float32 if x.dtype == torch.float16 else None).item()
        else:
            flat = flat.detach()
            total += torch.vdot(flat, flat).item()
    return math.isfinite(total)


def _one_base(xs: tuple) -> Optional[tuple]:
    """(base,) when xs are views of one tensor that holds as many elements as they do together (q, k and
    v split from one fused projection, as vlfast.nn.SelfAttention makes them), so that one pass over it
    reads each of theirs: each view alone has gaps, and PyTorch's sum over such a view ran 2-7x slower
    than the dot product of the whole (8 x 197 x 4 x 32: 120 against 18 us for q, k and v). Every element
    of xs is the base's, so a NaN or inf in them is found; were the views to overlap, the base could hold
    elements outside them too, and a NaN there would only send the call to the reference. Else None."""
    base = xs[0]._base
    if base is None or len(xs) < 2 or any(x._base is not base or x.dtype != base.dtype for x in xs[1:]):
        return None
    return (base,) if sum(x.numel() for x in xs) == base.numel() and _elements(base) is not None else None


def _usable(q: Tensor) -> bool:
    return q.is_cpu and q.shape[-1] > 0


def _expand_kv(x: Tensor, group: int) -> Tensor:
    return x.repeat_interleave(group, dim=1) if group > 1 else x


def _permuted(x: Tensor, perm: Optional[Tensor]) -> Tensor:
    return x if perm is None else x.index_select(2, perm)


def _unpermuted(x: Tensor, perm: Optional[Tensor]) -> Tensor:
    if perm is None:
        return x
    out = torch.empty_like(x)
    out.index_copy_(2, perm, x)
    return out


def _laid_out_like(x: Tensor, like: Tensor) -> Tensor:
    """x with the strides of torch.empty_like(like), as the op's fake kernel promises for out (the
    kernel's own out is so already)."""
    if x.stride() == like.stride():
        return x
    return x.contiguous() if like.is_contiguous() else torch.empty_like(like).copy_(x)


def empty_grad(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised tensor of x's (B, H, S, D) shape in (B, S, H, D) memory order: the layout
    the CPU kernel's backward gives gradients in (as PyTorch's meta kernel states), and so the one the
    op's fake kernel promises for impl="torch": the kernel's gradients need no copy."""
    return torch.empty_permuted(x.shape, (0, 2, 1, 3), dtype=dtype or x.dtype, device=x.device)


def _as_grad(g: Tensor, x: Tensor) -> Tensor:
    """g in x's dtype and empty_grad's layout (already so on the kernel's own path)."""
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    _, h, s, d = g.shape
    h, s, d = max(h, 1), max(s, 1), max(d, 1)  # strides as torch.empty_permuted computes them
    return g if g.stride()[1:] == (d, h * d, 1) and g.stride(0) == s * h * d else empty_grad(x).copy_(g)


def _single(plan: Plan) -> bool:
    """One tile over all queries in their plain layout."""
    return len(plan.tiles) == 1 and not plan.tiles[0].q.cols


def _forward_plan(q: Tensor, k: Tensor, v: Tensor, plan: Plan, scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, Sq, D) in q's dtype, natural-log lse (B, H, Sq) in the compute dtype, -inf where
    a row keeps nothing)."""
    ct = _reference.compute_dtype(q.dtype)
    if _single(plan):  # one call: its outputs are the answer
        tile = plan.tiles[0]
        out, lse = _FLASH(q, tile.k.of(k), tile.k.of(v), is_causal=tile.causal, attn_mask=tile.bias, scale=scale)
        return out, lse  # in the compute dtype already
    b, h, sq, d = q.shape
    if plan.disjoint:  # each query in one tile: write its outputs where they go
        out = (torch.zeros if plan.empty is not None else torch.empty)(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((b, h, sq), float("-inf"), dtype=ct, device=q.device)
        for tile in plan.tiles:
            o, l = _FLASH(tile.q.of(q), tile.k.of(k), tile.k.of(v), is_causal=tile.causal, attn_mask=tile.bias,
                          scale=scale)
            tile.q.of(out).copy_(o)
            tile.q.of(lse).copy_(l)  # rows this tile leaves empty are in plan.empty
        return out, lse
    acc = torch.zeros(b, h, sq, d, dtype=ct, device=q.device)
    lse = torch.full((b, h, sq), float("-inf"), dtype=ct, device=q.device)
    for tile in plan.tiles:
        o, l = _FLASH(tile.q.of(q), tile.k.of(k), tile.k.of(v), is_causal=tile.causal, attn_mask=tile.bias,
                      scale=scale)
        l = l.to(ct)
        if tile.empty is not None:  # the kernel gives these rows lse 0: they must weigh nothing
            l = l.masked_fill(tile.empty, float("-inf"))
        acc_v, lse_v = tile.q.of(acc), tile.q.of(lse)
        new = torch.logaddexp(lse_v, l)
        safe = torch.where(torch.isinf(new), torch.zeros_like(new), new)  # rows with nothing yet
        acc_v.mul_(torch.exp(lse_v - safe)[..., None]).add_(o.to(ct) * torch.exp(l - safe)[..., None])
        lse_v.copy_(new)
    return acc.to(q.dtype), lse


def _backward_plan(do, q, k, v, out, lse, plan: Plan, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) with k, v already expanded to q's heads; lse natural, +inf on empty rows."""
    if _single(plan):
        tile = plan.tiles[0]
        return _FLASH_BWD(do, q, tile.k.of(k), tile.k.of(v), out, lse.to(_reference.compute_dtype(q.dtype)), 0.0,
                          tile.causal, attn_mask=tile.bias, scale=scale)
    ct = _reference.compute_dtype(q.dtype)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    # dq of a query in one tile is written once; dk / dv sum over tiles (in the compute dtype)
    dq = (torch.zeros if plan.empty is not None or not plan.disjoint else torch.empty)(
        q.shape, dtype=q.dtype if plan.disjoint else ct, device=q.device)
    dk, dv = (torch.zeros(x.shape, dtype=ct, device=q.device) for x in (k, v))
    for tile in plan.tiles:
        g = _FLASH_BWD(tile.q.of(do), tile.q.of(q), tile.k.of(k), tile.k.of(v), tile.q.of(out), tile.q.of(lse),
                       0.0, tile.causal, attn_mask=tile.bias, scale=scale)
        if plan.disjoint:
            tile.q.of(dq).copy_(g[0])
        else:
            tile.q.of(dq).add_(g[0])
        tile.k.of(dk).add_(g[1])
        tile.k.of(dv).add_(g[2])
    return dq, dk, dv


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Mask], scale: float,
            verdict: Optional[dict] = None, lse_units: Optional[str] = "base2") -> tuple[Tensor, Optional[Tensor]]:
    """(out (B, H, Sq, D), lse (B, H, Sq)) as reference.forward gives them. verdict: a dict that gets
    "finite": True when q, k and v hold no NaN or inf (backward(..., inputs_finite=True) may then skip
    its checks of q, k, v and out). The check reads the inputs: the kernel's outputs do not show
    every NaN (it drops NaN scores in some shapes). lse_units: "base2" (the op's lse2), "natural" (the
    kernel's own, in any layout: what backward(..., lse_units="natural") takes, for callers that keep lse
    to themselves) or None (not needed: may be None). Each skips a copy of lse, ~2 % of a small call."""
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    if not _usable(q) or sq == 0 or sk == 0 or not _finite(q, k, v):
        out, lse2 = _reference.forward(q, k, v, mask, scale)
        return _laid_out_like(out, q), lse2 * (1.0 / LOG2E) if lse_units == "natural" else lse2
    if verdict is not None:
        verdict["finite"] = True
    plan = _plan(mask, sq, sk, q.dtype, q.device)
    group = h // k.shape[1]
    if group == 1 and plan.perm is None and plan.empty is None and _single(plan):  # the usual case, lean
        tile = plan.tiles[0]
        out, lse = _FLASH(q, tile.k.of(k), tile.k.of(v), is_causal=tile.causal, attn_mask=tile.bias, scale=scale)
        if lse_units != "base2":
            return _laid_out_like(out, q), lse if lse_units == "natural" else None
        return _laid_out_like(out, q), lse.contiguous().mul_(LOG2E)  # lse: (B, S, H) in memory, ours to change
    qp, kp, vp = _permuted(q, plan.perm), _permuted(_expand_kv(k, group), plan.perm), \
        _permuted(_expand_kv(v, group), plan.perm)
    out, lse = _forward_plan(qp, kp, vp, plan, scale)
    out, lse = _unpermuted(out, plan.perm), _unpermuted(lse, plan.perm)
    if lse_units != "natural":  # the kernel's lse is (B, S, H) in memory; lse is ours to change
        lse = lse.contiguous().mul_(LOG2E)
    if plan.empty is not None:  # rows that keep nothing: output 0, lse +inf (no row else is empty)
        out = out.masked_fill(plan.empty[..., None], 0.0)
        lse = lse.masked_fill(plan.empty, float("inf"))
    return _laid_out_like(out, q), lse


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, mask: Optional[Mask],
             scale: float, inputs_finite: bool = False, lse_units: str = "base2") -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for upstream do, as reference.backward gives them. inputs_finite: out is this module's
    forward of q, k, v (autograd's saved tensors, unchanged since) and its verdict was "finite", so only
    do needs the check. lse_units: "natural" when lse2 is forward(..., lse_units="natural")'s lse."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if not _usable(q) or sq == 0 or sk == 0 or not (_finite(do) if inputs_finite else _finite(do, out, q, k, v)):
        # the kernel's backward would give NaN dq on a fully masked row whose q is NaN (the spec: 0)
        grads = _reference.backward(do, q, k, v, out, lse2 * LOG2E if lse_units == "natural" else lse2, mask,
                                    scale)
        return tuple(_as_grad(g, x) for g, x in zip(grads, (q, k, v)))
    plan = _plan(mask, sq, sk, q.dtype, q.device)
    group = h // hkv
    # +inf on empty rows: their probabilities are exp(s - inf) = 0
    lse = lse2 if lse_units == "natural" else lse2 * (1.0 / LOG2E)
    if group == 1 and plan.perm is None and _single(plan):  # the usual case, lean
        tile = plan.tiles[0]
        grads = _FLASH_BWD(do, q, tile.k.of(k), tile.k.of(v), out, lse.to(_reference.compute_dtype(q.dtype)), 0.0,
                           tile.causal, attn_mask=tile.bias, scale=scale)
        return _as_grad(grads[0], q), _as_grad(grads[1], k), _as_grad(grads[2], v)
    args = [_permuted(x, plan.perm) for x in (do, q, _expand_kv(k, group), _expand_kv(v, group), out)]
    lse = _permuted(lse, plan.perm)
    dq, dk, dv = _backward_plan(*args, lse, plan, scale)
    dq, dk, dv = (_unpermuted(x, plan.perm) for x in (dq, dk, dv))
    if group > 1:  # summed straight into the gradient layout
        dk, dv = (torch.sum(g.view(b, hkv, group, sk, d), dim=2, out=empty_grad(x, g.dtype))
                  for g, x in ((dk, k), (dv, v)))
    return _as_grad(dq, q), _as_grad(dk, k), _as_grad(dv, v)


# --- the packed layout: one sequence at a time ----------------------------------------------------

@dataclass
class Padding:
    """Where packed tokens sit in a padded (B, S_max) batch: token t is row batch[t], position pos[t]."""
    batch: Tensor   # (T,) int64
    pos: Tensor     # (T,) int64
    valid: Tensor   # (B, S_max) bool: real tokens
    rows: int
    longest: int

    def pad(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """(T, H, ...) -> (B, H, S_max, ...) (a transposed view of (B, S_max, H, ...)), `fill` at padding."""
        out = x.new_full((self.rows, self.longest, *x.shape[1:]), fill)
        out[self.batch, self.pos] = x
        return out.transpose(1, 2)

    def unpad(self, x: Tensor) -> Tensor:
        """(B, H, S_max, ...) -> (T, H, ...)."""
        return x.transpose(1, 2)[self.batch, self.pos]


def _padding(cu_q: Tensor, cu_k: Tensor, mask: Optional[Mask]) -> Optional[Padding]:
    """The padded layout that runs packed self-attention (the same sequences for queries and keys; no mask
    or causal alone) as one batched call, or None. Padding costs work, so only when the padded batch
    holds at most twice the tokens; one call instead of one per sequence, whose fixed cost dominates
    short sequences (CLIP's text tower: 16 captions, 4 layers, 128 calls forward and backward)."""
    if mask is not None and not (mask.causal and mask.window is None and mask.span_ids is None
                                 and mask.dalle is None and mask.key_valid is None):
        return None
    if cu_q is not cu_k and not torch.equal(cu_q, cu_k):
        return None
    counts = cu_q[1:] - cu_q[:-1]
    lengths = counts.tolist()
    rows, longest, total = len(lengths), max(lengths, default=0), sum(lengths)
    if rows < 2 or total == 0 or rows * longest > 2 * total:
        return None
    device = cu_q.device
    batch = torch.repeat_interleave(torch.arange(rows, device=device), counts.long(), output_size=total)
    pos = torch.arange(total, device=device) - cu_q.long()[batch]
    valid = torch.arange(longest, device=device)[None, :] < counts.long()[:, None]
    return Padding(batch, pos, valid, rows, longest)


def _padded_mask(mask: Optional[Mask], layout: Padding) -> Mask:
    """Per-sequence causality (or none) with the padding's keys ruled out."""
    return Mask(causal=mask is not None, key_valid=layout.valid)


def forward_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, mask: Optional[Mask],
                   scale: float) -> tuple[Tensor, Tensor]:
    """(out (Tq, H, D), lse2 (H, Tq)) for packed sequences: one padded call (_padding), else this
    module's forward per sequence."""
    layout = _padding(cu_q, cu_k, mask)
    if layout is None:
        return _reference.forward_varlen(q, k, v, cu_q, cu_k, mask, scale, dense_forward=forward)
    out, lse2 = forward(layout.pad(q), layout.pad(k), layout.pad(v), _padded_mask(mask, layout), scale)
    return layout.unpad(out), layout.unpad(lse2[..., None])[..., 0].transpose(0, 1)


def backward_varlen(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, cu_q: Tensor,
                    cu_k: Tensor, mask: Optional[Mask], scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for packed sequences, as forward_varlen ran them. Padded queries get do = 0 and
    lse2 = +inf (probabilities 0), so they add nothing to any gradient."""
    layout = _padding(cu_q, cu_k, mask)
    if layout is None:
        return _reference.backward_varlen(do, q, k, v, out, lse2, cu_q, cu_k, mask, scale, dense_backward=backward)
    lse2_padded = layout.pad(lse2.transpose(0, 1)[..., None], float("inf"))[..., 0]  # (B, H, S_max)
    grads = backward(layout.pad(do), layout.pad(q), layout.pad(k), layout.pad(v), layout.pad(out), lse2_padded,
                     _padded_mask(mask, layout), scale)
    return tuple(layout.unpad(g) for g in grads)
