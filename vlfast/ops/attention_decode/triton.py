"""Decode attention in Triton: split-K over each row's keys (Flash-Decoding), then a merge.

_decode_split: one program per (row b, KV head g, split s). It holds the whole GQA group's queries
(Hq / Hkv heads x Sq rows, padded to BM >= 16 for the tensor cores), so every key and value byte of
that head is read once per step, and walks its split's keys in blocks of BN: contiguous rows, or
pages looked up in block_table per key (any page size). The mask is vlfast.attention's predicate
(_keep_tile) at cache positions. Each split writes its normalised partial output and base-2
log-sum-exp (float32); _decode_merge weighs the splits by exp2(lse_s - max) into the output and the
natural-log lse. Row b's L_b keys are cut into num_splits equal runs of whole blocks, so short rows
cost little and long rows spread over the GPU.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._backends import triton_interpreting
from ...masks import Mask
from ..attention.triton import _dot, _keep_tile, _precision

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


@triton.jit
def _decode_split(Q, K, V, O_part, LSE_part, lengths, block_table, qk_scale,
                  stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                  stride_vb, stride_vh, stride_vs, stride_bt, Hkv, Sq, page_size, num_splits,
                  span_ptr, span_stride, valid_ptr, valid_stride, window, text_len, img_cols, dalle_half,
                  GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr,
                  BN: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr, SPANS: tl.constexpr,
                  WINDOW: tl.constexpr, DALLE: tl.constexpr, KEY_VALID: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr):
    """O_part (B, Hq, Sq, splits, BLOCK_D) and LSE_part (B, Hq, Sq, splits), both float32, contiguous."""
    pid_bg = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bg // Hkv
    g = pid_bg % Hkv
    length = tl.load(lengths + b)
    per_split = tl.cdiv(tl.cdiv(length, num_splits), BN) * BN
    start = split * per_split
    end = tl.minimum(length, start + per_split)

    rows = tl.arange(0, BM)
    row_ok = rows < GROUP * Sq
    head = g * GROUP + rows // Sq
    i = rows % Sq
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims < HEAD_DIM
    q = tl.load(Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
                + i[:, None].to(tl.int64) * stride_qs + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    p_q = length - Sq + i
    span_row = span_ptr + b.to(tl.int64) * span_stride
    valid_row = valid_ptr + b.to(tl.int64) * valid_stride

    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BLOCK_D), dtype=tl.float32)
    for n0 in range(start, end, BN):
        cols = n0 + tl.arange(0, BN)
        col_ok = cols < end
        if PAGED:
            page = tl.load(block_table + b.to(tl.int64) * stride_bt + cols // page_size, mask=col_ok, other=0)
            k_rows = page.to(tl.int64) * stride_kb + (cols % page_size).to(tl.int64) * stride_ks
            v_rows = page.to(tl.int64) * stride_vb + (cols % page_size).to(tl.int64) * stride_vs
        else:
            k_rows = b.to(tl.int64) * stride_kb + cols.to(tl.int64) * stride_ks
            v_rows = b.to(tl.int64) * stride_vb + cols.to(tl.int64) * stride_vs
        k = tl.load(K + g.to(tl.int64) * stride_kh + k_rows[None, :] + dims[:, None],
                    mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BN)
        s = _dot(q, k, None, UPCAST, PRECISION) * qk_scale
        keep = _keep_tile(p_q, cols, span_row, valid_row, length, window, text_len, img_cols, dalle_half,
                          CAUSAL, SPANS, WINDOW, DALLE, KEY_VALID) & col_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + g.to(tl.int64) * stride_vh + v_rows[:, None] + dims[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BN, BLOCK_D)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
        m_i = m_new

    empty = l_i == 0.0
    out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    # (B, Hq, Sq, splits) row-major: query (b, head, i) at ((b * Hq + head) * Sq + i) * splits + split
    slot = ((b.to(tl.int64) * Hkv * GROUP + head) * Sq + i) * num_splits + split
    tl.store(LSE_part + slot, lse2, mask=row_ok)
    tl.store(O_part + slot[:, None] * BLOCK_D + dims[None, :], out, mask=row_ok[:, None])


@triton.jit
def _decode_merge(O_part, LSE_part, O, LSE, num_splits, stride_ob, stride_oh, stride_os, H, Sq,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr):
    """One program per query: the splits' outputs weighed by their softmax mass."""
    pid = tl.program_id(0)
    b = pid // (H * Sq)
    h = (pid // Sq) % H
    i = pid % Sq
    splits = tl.arange(0, SPLITS)
    s_ok = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    lse2 = tl.load(LSE_part + pid.to(tl.int64) * num_splits + splits, mask=s_ok, other=float("-inf"))
    m = tl.max(lse2, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse2 - m_use)  # 0 for empty splits
    total = tl.sum(w, axis=0)
    part = tl.load(O_part + (pid.to(tl.int64) * num_splits + splits[:, None]) * BLOCK_D + dims[None, :],
                   mask=s_ok[:, None], other=0.0)
    out = tl.sum(part * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + i.to(tl.int64) * stride_os + dims,
             out.to(O.dtype.element_ty), mask=dims < HEAD_DIM)
    lse2_total = m_use + tl.log2(tl.where(total == 0.0, 1.0, total))
    lse = tl.where(total == 0.0, float("-inf"), lse2_total * 0.6931471805599453)  # natural log: x ln 2
    tl.store(LSE + pid, lse)


def block_keys(block_d: int) -> int:
    """BN: keys per block (smaller for wide heads, so two stages of K and V fit in shared memory)."""
    return 32 if triton_interpreting() or block_d > 128 else 64


def warps_for(bm: int) -> int:
    """Warps of the split kernel: 8 when it holds 128 query rows (4 would need every register)."""
    return 8 if bm > 64 else 4


def pick_splits(batch: int, kv_heads: int, capacity: int, bn: int, device: torch.device) -> int:
    """Splits per row so that about two programs per SM run, none shorter than 4 key blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    wanted = -(-2 * sms // max(1, batch * kv_heads))
    return max(1, min(wanted, max(1, capacity // (4 * bn)), MAX_SPLITS))


def _mask_args(mask: Optional[Mask], dummy: Tensor) -> tuple:
    """(span ptr, span stride, valid ptr, valid stride, window, text_len, cols, dalle_half, flags)."""
    spans = mask.span_ids if mask is not None and mask.span_ids is not None else None
    valid = mask.key_valid if mask is not None and mask.key_valid is not None else None
    span_t = dummy if spans is None else spans.to(torch.int32).contiguous()
    valid_t = dummy if valid is None else valid.to(torch.int8).contiguous()
    span_stride = span_t.shape[-1] if spans is not None and spans.dim() == 2 else 0
    valid_stride = valid_t.shape[-1] if valid is not None else 0
    dalle = mask.dalle if mask is not None and mask.dalle is not None else (0, 0, 1, 0, 0)
    flags = dict(CAUSAL=bool(mask is not None and mask.causal), SPANS=spans is not None,
                 WINDOW=bool(mask is not None and mask.window), DALLE=int(dalle[3]), KEY_VALID=valid is not None)
    window = mask.window if mask is not None and mask.window else 0
    return (span_t, span_stride, valid_t, valid_stride, window, dalle[0], dalle[2], dalle[4] // 2), flags


def forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, block_table: Optional[Tensor],
            mask: Optional[Mask], scale: float, num_splits: int) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Sq, D) like q, lse (B, Hq, Sq) float32); lengths (B,) int32 = L_b."""
    b, hq, sq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    block_d = max(16, triton.next_power_of_2(d))
    bn = block_keys(block_d)
    bm = max(16, triton.next_power_of_2(group * sq))
    paged = block_table is not None
    cap = k_cache.shape[2] if not paged else block_table.shape[1] * k_cache.shape[2]
    splits = num_splits or pick_splits(b, hkv, cap, bn, q.device)
    splits = min(splits, MAX_SPLITS)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    if b == 0:
        return out, lse
    o_part = torch.empty(b, hq, sq, splits, block_d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, hq, sq, splits, dtype=torch.float32, device=q.device)
    dummy = lengths  # an int32 pointer for the arguments a variant never reads (no allocation, no fill)
    mask_args, flags = _mask_args(mask, dummy)
    table = block_table if paged else dummy
    interpreted = triton_interpreting()
    _decode_split[(b * hkv, splits)](
        q, k_cache, v_cache, o_part, lse_part, lengths, table, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), table.stride(0) if paged else 0, hkv, sq,
        k_cache.shape[2] if paged else 1, splits, *mask_args,
        GROUP=group, HEAD_DIM=d, BLOCK_D=block_d, BM=bm, BN=bn, PAGED=paged, **flags,
        UPCAST=interpreted and q.dtype == torch.bfloat16, PRECISION=_precision(q.dtype),
        num_warps=warps_for(bm), num_stages=2)
    _decode_merge[(b * hq * sq,)](o_part, lse_part, out, lse, splits, out.stride(0), out.stride(1), out.stride(2),
                                  hq, sq, HEAD_DIM=d, BLOCK_D=block_d,
                                  SPLITS=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return out, lse
