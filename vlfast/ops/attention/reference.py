"""Attention in plain PyTorch: the specification, and the CPU path (dense and packed layouts).

out[b, h, i] = sum_j softmax_j(scale * <q_i, k_j> over the kept j) v_j, with kv head h // (H / H_kv)
(grouped-query attention); a query that keeps no key gets 0 and zero gradients, and so does every
query when Sk = 0 (no keys at all). A NaN in q, k or v reaches every output row that attends it. Which
pairs are kept is the mask's predicate (vlfast.masks); query i of Sq sits at position i + (Sk - Sq).

The forward also returns lse2 = log2 of the softmax denominator in base-2 units of the scaled
logits (+inf where a row keeps nothing), which is what the kernels save for the backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...masks import Mask

LOG2E = 1.4426950408889634
# Scores per chunk of queries on the CPU path (64 MiB at float32).
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kept(mask: Optional[Mask], i0: int, i1: int, sq: int, sk: int, batch: int, device) -> Optional[Tensor]:
    """(B or 1, i1 - i0, Sk) bool for query rows [i0, i1), or None when every pair is kept."""
    if mask is None:
        return None
    p_q = torch.arange(i0, i1, device=device)[None, :, None] + (sk - sq)
    p_k = torch.arange(sk, device=device)[None, None, :]
    b = mask.batch_size()
    bidx = torch.arange(b, device=device)[:, None, None] if b else None
    return mask.allowed(p_q, p_k, bidx)


def attention_dense(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Mask], scale: float) -> Tensor:
    """The specification, differentiable by autograd: q (B, H, Sq, D), k / v (B, Hkv, Sk, D)."""
    ct = compute_dtype(q.dtype)
    group = q.shape[1] // k.shape[1]
    k = k.to(ct).repeat_interleave(group, dim=1)
    v = v.to(ct).repeat_interleave(group, dim=1)
    s = scale * q.to(ct) @ k.transpose(-1, -2)
    keep = _kept(mask, 0, q.shape[2], q.shape[2], k.shape[2], q.shape[0], q.device)
    p = torch.softmax(s if keep is None else s.masked_fill(~keep[:, None], float("-inf")), dim=-1)
    if keep is not None:  # rows with no kept key: 0 (softmax gives NaN there); NaN inputs stay NaN
        p = torch.where(keep[:, None].any(-1, keepdim=True), p, torch.zeros_like(p))
    return p @ v


def _chunk(sk: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(sk, 1))


def forward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Mask], scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, Sq, D) in q's dtype, lse2 (B, H, Sq) in the compute dtype), in chunks of queries."""
    ct = compute_dtype(q.dtype)
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    group = h // k.shape[1]
    kk = k.to(ct).repeat_interleave(group, dim=1)
    vv = v.to(ct).repeat_interleave(group, dim=1)
    out = torch.empty(q.shape, dtype=ct, device=q.device)
    lse2 = torch.empty(b, h, sq, dtype=ct, device=q.device)
    if sk == 0:  # no keys: every row keeps nothing
        return torch.zeros_like(q), torch.full((b, h, sq), float("inf"), dtype=ct, device=q.device)
    step = _chunk(sk * h * b)
    for i0 in range(0, sq, step):
        i1 = min(sq, i0 + step)
        s = (scale * LOG2E) * q[:, :, i0:i1].to(ct) @ kk.transpose(-1, -2)
        keep = _kept(mask, i0, i1, sq, sk, b, q.device)
        if keep is not None:
            s = s.masked_fill(~keep[:, None], float("-inf"))
        # Empty rows come from the mask, not from the scores, so a NaN score keeps its row NaN.
        empty = (~keep.any(-1))[:, None, :, None] if keep is not None else \
            torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=q.device)
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(empty, torch.zeros_like(m), m)
        p = torch.exp2(s - m)
        l = p.sum(dim=-1, keepdim=True)
        out[:, :, i0:i1] = torch.where(empty, torch.zeros_like(l), (p @ vv) / l.clamp(min=1e-30))
        lse2[:, :, i0:i1] = torch.where(empty[..., 0], torch.full_like(l[..., 0], float("inf")),
                                        m[..., 0] + torch.log2(l[..., 0].clamp(min=1e-30)))
    return out.to(q.dtype), lse2  # float64 for float64 inputs, else float32


def backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, mask: Optional[Mask],
             scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for upstream do, recomputing the probabilities from lse2."""
    ct = compute_dtype(q.dtype)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = h // hkv
    kk = k.to(ct).repeat_interleave(group, dim=1)
    vv = v.to(ct).repeat_interleave(group, dim=1)
    delta = (do.to(ct) * out.to(ct)).sum(dim=-1, keepdim=True)
    dq = torch.empty(q.shape, dtype=ct, device=q.device)
    dk = torch.zeros(b, h, sk, d, dtype=ct, device=q.device)
    dv = torch.zeros(b, h, sk, d, dtype=ct, device=q.device)
    step = _chunk(sk * h * b)
    for i0 in range(0, sq, step):
        i1 = min(sq, i0 + step)
        qc, doc = q[:, :, i0:i1].to(ct), do[:, :, i0:i1].to(ct)
        s = (scale * LOG2E) * qc @ kk.transpose(-1, -2)
        keep = _kept(mask, i0, i1, sq, sk, b, q.device)
        if keep is not None:
            s = s.masked_fill(~keep[:, None], float("-inf"))
        p = torch.exp2(s - lse2[:, :, i0:i1, None].to(ct))  # lse2 = +inf on empty rows: p = 0
        dv += p.transpose(-1, -2) @ doc
        ds = p * (doc @ vv.transpose(-1, -2) - delta[:, :, i0:i1])
        dq[:, :, i0:i1] = scale * ds @ kk
        dk += scale * ds.transpose(-1, -2) @ qc
    dk = dk.view(b, hkv, group, sk, d).sum(dim=2)
    dv = dv.view(b, hkv, group, sk, d).sum(dim=2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


# --- the packed layout: one sequence at a time ----------------------------------------------------

def _bounds(cu_q: Tensor, cu_k: Tensor):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def _sequence_mask(mask: Optional[Mask], k0: int, k1: int) -> Optional[Mask]:
    """The mask of one packed sequence: its slice of the packed span ids."""
    if mask is None or mask.span_ids is None:
        return mask
    return Mask(causal=mask.causal, window=mask.window, span_ids=mask.span_ids[k0:k1], dalle=mask.dalle)


def _seq(x: Tensor, t0: int, t1: int) -> Tensor:
    return x[t0:t1].transpose(0, 1)[None]  # (T, H, D) slice -> (1, H, L, D)


def forward_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, mask: Optional[Mask],
                   scale: float, dense_forward=forward) -> tuple[Tensor, Tensor]:
    """(out (Tq, H, D), lse2 (H, Tq)) for packed sequences: dense_forward (this module's, or another
    implementation's with the same contract) on one sequence at a time."""
    out = torch.zeros_like(q)
    lse2 = torch.full((q.shape[1], q.shape[0]), float("inf"), dtype=compute_dtype(q.dtype), device=q.device)
    for q0, q1, k0, k1 in _bounds(cu_q, cu_k):
        if q1 == q0 or k1 == k0:  # no queries, or nothing to attend: output 0
            continue
        o, l = dense_forward(_seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1), _sequence_mask(mask, k0, k1),
                             scale)
        out[q0:q1] = o[0].transpose(0, 1)
        lse2[:, q0:q1] = l[0]
    return out, lse2


def backward_varlen(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor, cu_q: Tensor,
                    cu_k: Tensor, mask: Optional[Mask], scale: float,
                    dense_backward=backward) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for packed sequences, dense_backward on one sequence at a time."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for q0, q1, k0, k1 in _bounds(cu_q, cu_k):
        if q1 == q0 or k1 == k0:
            continue
        g = dense_backward(_seq(do, q0, q1), _seq(q, q0, q1), _seq(k, k0, k1), _seq(v, k0, k1),
                           _seq(out, q0, q1), lse2[None, :, q0:q1], _sequence_mask(mask, k0, k1), scale)
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = (x[0].transpose(0, 1) for x in g)
    return dq, dk, dv
