"""Triton flash attention, forward and backward, for the dense (B, H, S, D) and packed (T, H, D)
layouts and every mask of vlfast.masks; the math is in reference.py.

Forward (_attn_fwd): one program per (query block, batch * head); an online softmax in base 2 over
the key blocks the mask keeps. Which key blocks: for none / causal / sliding-window masks, bounds
computed in the kernel; for masks with spans, DALL-E patterns or key padding, a block map from
blocks.py (per query block: the key blocks to visit and whether each is fully kept). Fully kept
blocks skip the mask; boundary blocks evaluate it (_keep_tile). Saves lse2 (+inf on empty rows).
Backward, deterministic (no atomics): _attn_bwd_dkdv, one program per (key block, batch * kv head),
loops over the query heads of its group and the query blocks that reach the key block, holding
dK, dV in registers; _attn_bwd_dq, one program per (query block, batch * head), recomputes the
scores and accumulates dQ. delta = rowsum(dO * O) comes first (_attn_bwd_delta).
Tiles, warps and stages per pass come from tuning.py (defaults, or autotuning with VLFAST_AUTOTUNE=1).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _scratch
from ..._backends import triton_interpreting
from ..._gemm import ieee_fp32_gemms
from . import blocks, tuning

try:  # host-side TMA descriptors: triton >= 3.4 (the H200's 3.6 and this machine's 3.9 have them)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older triton: TMA configs run with plain loads
    TensorDescriptor = None
from .reference import LOG2E

_INTERPRET = triton_interpreting()


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32; the interpreter computes bf16 dots wrongly, so it gets fp32 operands."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _keep_tile(p_q, p_k, span_row, valid_row, k_len, window, text_len, img_cols, dalle_half,
               CAUSAL: tl.constexpr, SPANS: tl.constexpr, WINDOW: tl.constexpr, DALLE: tl.constexpr,
               KEY_VALID: tl.constexpr):
    """(BM, BN) bool: the mask's predicate (vlfast.masks.Mask.allowed) for positions p_q x p_k.

    span_row / valid_row point at this sequence's span ids / key validity."""
    keep = (p_q[:, None] * 0 + p_k[None, :]) < k_len  # keys past the sequence are never kept
    if CAUSAL:
        base = p_k[None, :] <= p_q[:, None]
        if SPANS:  # a span relaxes causality between its own tokens
            sq = tl.load(span_row + p_q, mask=(p_q >= 0) & (p_q < k_len), other=-2)
            sk = tl.load(span_row + p_k, mask=p_k < k_len, other=-3)
            base = base | ((sq[:, None] == sk[None, :]) & (sq[:, None] >= 0))
        keep = keep & base
    if WINDOW:
        keep = keep & (p_q[:, None] - p_k[None, :] < window)
    if DALLE > 0:  # text keys always kept; between image tokens, DALL-E's row / column / conv rule
        rq = (p_q - text_len) // img_cols
        cq = (p_q - text_len) % img_cols
        rk = (p_k - text_len) // img_cols
        ck = (p_k - text_len) % img_cols
        if DALLE == 1:
            image = rq[:, None] == rk[None, :]
        elif DALLE == 2:
            image = cq[:, None] == ck[None, :]
        else:
            dr = rq[:, None] - rk[None, :]
            dc = cq[:, None] - ck[None, :]
            image = (dr <= dalle_half) & (dr >= -dalle_half) & (dc <= dalle_half) & (dc >= -dalle_half)
        keep = keep & ((p_k[None, :] < text_len) | image)
    if KEY_VALID:
        valid = tl.load(valid_row + p_k, mask=p_k < k_len, other=0)
        keep = keep & (valid[None, :] != 0)
    return keep


@triton.jit
def _positions(idx, ok, offset, pos_ptr, k_len, PERMUTED: tl.constexpr):
    """Sequence positions of tokens idx: idx + offset, or pos[idx] in a permuted layout (keys past
    the end get k_len, which the mask drops)."""
    if PERMUTED:
        return tl.load(pos_ptr + idx, mask=ok, other=k_len)
    return idx + offset


@triton.jit
def _seq_bounds(cu_ptr, b, fixed_len, VARLEN: tl.constexpr):
    """(first token, length) of sequence b: from cu_seqlens when packed, else (0, fixed_len)."""
    if VARLEN:
        start = tl.load(cu_ptr + b)
        length = tl.load(cu_ptr + b + 1) - start
    else:
        start = b * 0
        length = b * 0 + fixed_len
    return start, length


@triton.jit
def _mask_rows(b, k_start, span_ptr, span_stride, valid_ptr, valid_stride, VARLEN: tl.constexpr):
    """Pointers to this sequence's span ids and key validity (packed ids are indexed by token)."""
    if VARLEN:
        return span_ptr + k_start, valid_ptr
    return span_ptr + b.to(tl.int64) * span_stride, valid_ptr + b.to(tl.int64) * valid_stride


@triton.jit
def _kv_blocks(m0, q_len, k_len, window, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """Key blocks [lo, hi) that queries [m0, m0 + BM) reach under no mask / causal / sliding window."""
    off = k_len - q_len
    hi = tl.cdiv(k_len, BN)
    lo = hi * 0
    if CAUSAL:
        last = tl.minimum(m0 + BM, q_len) - 1 + off  # the largest query position
        hi = tl.minimum(hi, tl.cdiv(tl.maximum(last + 1, 0), BN))
    if WINDOW:
        lo = tl.maximum(m0 + off - window + 1, 0) // BN
    return lo, hi


@triton.jit
def _q_blocks(n0, q_len, k_len, window, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
              WINDOW: tl.constexpr):
    """Query blocks [lo, hi) that reach keys [n0, n0 + BN) under no mask / causal / sliding window."""
    off = k_len - q_len
    hi = tl.cdiv(q_len, BM)
    lo = hi * 0
    if CAUSAL:
        lo = tl.minimum(tl.maximum(n0 - off, 0) // BM, hi)
    if WINDOW:
        last_key = tl.minimum(n0 + BN, k_len) - 1
        hi = tl.minimum(hi, tl.cdiv(tl.maximum(last_key + window - off, 0), BM))
    return lo, hi


@triton.jit
def _needs_mask(m0, n0, q_len, k_len, window, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr):
    """Whether tile (m0, n0) holds a pair the analytic masks drop, or keys / queries past the ends."""
    off = k_len - q_len
    need = (n0 + BN > k_len) | (m0 + BM > q_len)
    if CAUSAL:
        need = need | (n0 + BN - 1 > m0 + off)
    if WINDOW:
        need = need | (m0 + BM - 1 + off - n0 >= window)
    return need


@triton.jit
def _kv_iteration(b, pid_m, q_len, k_len, window, map_cnt, map_sb, map_nc, BM: tl.constexpr, BN: tl.constexpr,
                  HAS_MAP: tl.constexpr, MAP_PER_BATCH: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """(first block, block count, map row offset) of the key blocks query block pid_m visits."""
    map_b = b if MAP_PER_BATCH else b * 0
    map_row = (map_b.to(tl.int64) * map_sb + pid_m) * map_nc
    if HAS_MAP:
        lo = b * 0
        count = tl.load(map_cnt + map_b * map_sb + pid_m)
    else:
        lo, hi = _kv_blocks(pid_m * BM, q_len, k_len, window, BM, BN, CAUSAL, WINDOW)
        count = hi - lo
    return lo, count, map_row


@triton.jit
def _kv_block(t, lo, map_row, map_idx, map_full, m0, q_len, k_len, window, BM: tl.constexpr, BN: tl.constexpr,
              HAS_MAP: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """The t-th key block to visit and whether its tile needs the mask evaluated."""
    if HAS_MAP:
        kb = tl.load(map_idx + map_row + t)
        need = (tl.load(map_full + map_row + t) == 0) | ((kb + 1) * BN > k_len) | (m0 + BM > q_len)
    else:
        kb = lo + t
        need = _needs_mask(m0, kb * BN, q_len, k_len, window, BM, BN, CAUSAL, WINDOW)
    return kb, need


@triton.jit
def _attn_fwd(Q, K, V, O, LSE2, k_desc, v_desc, qk_scale,
              stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
              stride_vb, stride_vh, stride_vs, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
              cu_q, cu_k, Sq, Sk, H, GROUP,
              map_idx, map_full, map_cnt, map_sb, map_nc,
              span_ptr, span_stride, valid_ptr, valid_stride, window, text_len, img_cols, dalle_half, pos_ptr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              VARLEN: tl.constexpr, HAS_MAP: tl.constexpr, MAP_PER_BATCH: tl.constexpr,
              CAUSAL: tl.constexpr, SPANS: tl.constexpr, WINDOW: tl.constexpr, DALLE: tl.constexpr,
              KEY_VALID: tl.constexpr, PERMUTED: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    """TMA: K and V tiles come through k_desc / v_desc, descriptors of the dense (B, H_kv, Sk, D)
    tensors with (1, 1, BN, BLOCK_D) blocks (keys past Sk and dims past D read as zeros)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_bounds(cu_q, b, Sq, VARLEN)
    k_start, k_len = _seq_bounds(cu_k, b, Sk, VARLEN)
    m0 = pid_m * BM
    if m0 < q_len:
        rows = m0 + tl.arange(0, BM)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < q_len
        d_ok = dims < HEAD_DIM
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qs
        q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qs + dims[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        kvh = h // GROUP
        k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
        v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
        span_row, valid_row = _mask_rows(b, k_start, span_ptr, span_stride, valid_ptr, valid_stride, VARLEN)
        p_q = _positions(rows, row_ok, k_len - q_len, pos_ptr, k_len, PERMUTED)
        m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BM,), dtype=tl.float32)
        acc = tl.zeros((BM, BLOCK_D), dtype=tl.float32)
        lo, count, map_row = _kv_iteration(b, pid_m, q_len, k_len, window, map_cnt, map_sb, map_nc, BM, BN,
                                           HAS_MAP, MAP_PER_BATCH, CAUSAL, WINDOW)
        for t in range(0, count):
            kb, need = _kv_block(t, lo, map_row, map_idx, map_full, m0, q_len, k_len, window, BM, BN, HAS_MAP,
                                 CAUSAL, WINDOW)
            cols = kb * BN + tl.arange(0, BN)
            col_ok = cols < k_len
            if TMA:
                k = tl.trans(k_desc.load([b, kvh, kb * BN, 0]).reshape(BN, BLOCK_D))
            else:
                k = tl.load(k_base + cols[None, :].to(tl.int64) * stride_ks + dims[:, None],
                            mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = _dot(q, k, None, UPCAST, PRECISION) * qk_scale
            if need:
                keep = _keep_tile(p_q, _positions(cols, col_ok, 0, pos_ptr, k_len, PERMUTED), span_row, valid_row,
                                  k_len, window, text_len, img_cols, dalle_half,
                                  CAUSAL, SPANS, WINDOW, DALLE, KEY_VALID)
                s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if TMA:
                v = v_desc.load([b, kvh, kb * BN, 0]).reshape(BN, BLOCK_D)
            else:
                v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vs + dims[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, PRECISION)
            m_i = m_new
        empty = l_i == 0.0
        out = tl.where(empty[:, None], 0.0, acc / tl.where(empty, 1.0, l_i)[:, None])
        o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_os
        tl.store(o_base + rows[:, None].to(tl.int64) * stride_os + dims[None, :], out.to(O.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        lse2 = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(LSE2 + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows, lse2, mask=row_ok)


@triton.jit
def _attn_bwd_delta(O, DO, DELTA, stride_ob, stride_oh, stride_os, stride_db, stride_dh, stride_dos,
                    stride_lb, stride_lh, cu_q, Sq, H,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, VARLEN: tl.constexpr):
    """delta = rowsum(dO * O) in float32, laid out like lse2."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_bounds(cu_q, b, Sq, VARLEN)
    rows = pid_m * BM + tl.arange(0, BM)
    dims = tl.arange(0, BLOCK_D)
    ok = (rows < q_len)[:, None] & (dims < HEAD_DIM)[None, :]
    tok = (q_start + rows)[:, None].to(tl.int64)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + tok * stride_os + dims[None, :],
                mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + tok * stride_dos + dims[None, :],
                 mask=ok, other=0.0).to(tl.float32)
    tl.store(DELTA + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows,
             tl.sum(o * do, axis=1), mask=rows < q_len)


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE2, DELTA, a_desc, b_desc, qk_scale, sm_scale,
                 stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                 stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                 stride_gqb, stride_gqh, stride_gqs, stride_lb, stride_lh,
                 cu_q, cu_k, Sq, Sk, H, GROUP,
                 map_idx, map_full, map_cnt, map_sb, map_nc,
                 span_ptr, span_stride, valid_ptr, valid_stride, window, text_len, img_cols, dalle_half, pos_ptr,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 VARLEN: tl.constexpr, HAS_MAP: tl.constexpr, MAP_PER_BATCH: tl.constexpr,
                 CAUSAL: tl.constexpr, SPANS: tl.constexpr, WINDOW: tl.constexpr, DALLE: tl.constexpr,
                 KEY_VALID: tl.constexpr, PERMUTED: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dQ for one query block of one head, over the key blocks the forward visited.
    TMA: K and V tiles through a_desc / b_desc ((1, 1, BN, BLOCK_D) blocks, as in the forward)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    q_start, q_len = _seq_bounds(cu_q, b, Sq, VARLEN)
    k_start, k_len = _seq_bounds(cu_k, b, Sk, VARLEN)
    m0 = pid_m * BM
    if m0 < q_len:
        rows = m0 + tl.arange(0, BM)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < q_len
        d_ok = dims < HEAD_DIM
        tile = row_ok[:, None] & d_ok[None, :]
        q_off = b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + (q_start + rows)[:, None].to(tl.int64) * stride_qs \
            + dims[None, :]
        d_off = b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh + (q_start + rows)[:, None].to(tl.int64) * stride_ds \
            + dims[None, :]
        q = tl.load(Q + q_off, mask=tile, other=0.0)
        do = tl.load(DO + d_off, mask=tile, other=0.0)
        l_off = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows
        lse2 = tl.load(LSE2 + l_off, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + l_off, mask=row_ok, other=0.0)
        kvh = h // GROUP
        k_base = K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
        v_base = V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
        span_row, valid_row = _mask_rows(b, k_start, span_ptr, span_stride, valid_ptr, valid_stride, VARLEN)
        p_q = _positions(rows, row_ok, k_len - q_len, pos_ptr, k_len, PERMUTED)
        dq = tl.zeros((BM, BLOCK_D), dtype=tl.float32)
        lo, count, map_row = _kv_iteration(b, pid_m, q_len, k_len, window, map_cnt, map_sb, map_nc, BM, BN,
                                           HAS_MAP, MAP_PER_BATCH, CAUSAL, WINDOW)
        for t in range(0, count):
            kb, need = _kv_block(t, lo, map_row, map_idx, map_full, m0, q_len, k_len, window, BM, BN, HAS_MAP,
                                 CAUSAL, WINDOW)
            cols = kb * BN + tl.arange(0, BN)
            col_ok = cols < k_len
            if TMA:
                kt = tl.trans(a_desc.load([b, kvh, kb * BN, 0]).reshape(BN, BLOCK_D))
                vt = tl.trans(b_desc.load([b, kvh, kb * BN, 0]).reshape(BN, BLOCK_D))
            else:
                kt = tl.load(k_base + cols[None, :].to(tl.int64) * stride_ks + dims[:, None],
                             mask=col_ok[None, :] & d_ok[:, None], other=0.0)
                vt = tl.load(v_base + cols[None, :].to(tl.int64) * stride_vs + dims[:, None],
                             mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = _dot(q, kt, None, UPCAST, PRECISION) * qk_scale
            if need:
                keep = _keep_tile(p_q, _positions(cols, col_ok, 0, pos_ptr, k_len, PERMUTED), span_row, valid_row,
                                  k_len, window, text_len, img_cols, dalle_half,
                                  CAUSAL, SPANS, WINDOW, DALLE, KEY_VALID)
                s = tl.where(keep, s, float("-inf"))
            p = tl.exp2(s - lse2[:, None])  # lse2 = +inf on rows that keep nothing: p = 0
            ds = p * (_dot(do, vt, None, UPCAST, PRECISION) - delta[:, None])
            dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq, UPCAST, PRECISION)
        g_off = b.to(tl.int64) * stride_gqb + h.to(tl.int64) * stride_gqh \
            + (q_start + rows)[:, None].to(tl.int64) * stride_gqs + dims[None, :]
        tl.store(DQ + g_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE2, DELTA, a_desc, b_desc, qk_scale, sm_scale,
                   stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                   stride_gkb, stride_gkh, stride_gks, stride_lb, stride_lh,
                   cu_q, cu_k, Sq, Sk, H_KV, GROUP,
                   map_idx, map_full, map_cnt, map_sb, map_nc,
                   span_ptr, span_stride, valid_ptr, valid_stride, window, text_len, img_cols, dalle_half, pos_ptr,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   VARLEN: tl.constexpr, HAS_MAP: tl.constexpr, MAP_PER_BATCH: tl.constexpr,
                   CAUSAL: tl.constexpr, SPANS: tl.constexpr, WINDOW: tl.constexpr, DALLE: tl.constexpr,
                   KEY_VALID: tl.constexpr, PERMUTED: tl.constexpr, UPCAST: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    """dK, dV for one key block of one kv head: its query heads in turn, deterministic.
    dK and dV share the layout given by stride_gk*; dO shares q's head and token layout.
    TMA: Q and dO tiles through a_desc / b_desc ((1, 1, BM, BLOCK_D) blocks; rows past Sq read 0)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    kvh = pid_bh % H_KV
    q_start, q_len = _seq_bounds(cu_q, b, Sq, VARLEN)
    k_start, k_len = _seq_bounds(cu_k, b, Sk, VARLEN)
    n0 = pid_n * BN
    if n0 < k_len:
        cols = n0 + tl.arange(0, BN)
        dims = tl.arange(0, BLOCK_D)
        col_ok = cols < k_len
        d_ok = dims < HEAD_DIM
        tile = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b.to(tl.int64) * stride_kb + kvh.to(tl.int64) * stride_kh
                    + (k_start + cols)[:, None].to(tl.int64) * stride_ks + dims[None, :], mask=tile, other=0.0)
        v = tl.load(V + b.to(tl.int64) * stride_vb + kvh.to(tl.int64) * stride_vh
                    + (k_start + cols)[:, None].to(tl.int64) * stride_vs + dims[None, :], mask=tile, other=0.0)
        span_row, valid_row = _mask_rows(b, k_start, span_ptr, span_stride, valid_ptr, valid_stride, VARLEN)
        p_k = _positions(cols, col_ok, 0, pos_ptr, k_len, PERMUTED)
        dk = tl.zeros((BN, BLOCK_D), dtype=tl.float32)
        dv = tl.zeros((BN, BLOCK_D), dtype=tl.float32)
        if HAS_MAP:
            map_b = b if MAP_PER_BATCH else b * 0
            map_row = (map_b.to(tl.int64) * map_sb + pid_n) * map_nc
            lo = b * 0
            count = tl.load(map_cnt + map_b * map_sb + pid_n)
        else:
            lo, hi = _q_blocks(n0, q_len, k_len, window, BM, BN, CAUSAL, WINDOW)
            count = hi - lo
        for g in range(0, GROUP):
            h = kvh * GROUP + g
            q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
            do_base = DO + b.to(tl.int64) * stride_db + h.to(tl.int64) * stride_dh
            l_base = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
            for t in range(0, count):
                if HAS_MAP:
                    qb = tl.load(map_idx + map_row + t)
                    need = (tl.load(map_full + map_row + t) == 0) | (n0 + BN > k_len) | ((qb + 1) * BM > q_len)
                else:
                    qb = lo + t
                    need = _needs_mask(qb * BM, n0, q_len, k_len, window, BM, BN, CAUSAL, WINDOW)
                rows = qb * BM + tl.arange(0, BM)
                row_ok = rows < q_len
                qtile = row_ok[:, None] & d_ok[None, :]
                if TMA:
                    q = a_desc.load([b, h, qb * BM, 0]).reshape(BM, BLOCK_D)
                    do = b_desc.load([b, h, qb * BM, 0]).reshape(BM, BLOCK_D)
                else:
                    q = tl.load(q_base + (q_start + rows)[:, None].to(tl.int64) * stride_qs + dims[None, :],
                                mask=qtile, other=0.0)
                    do = tl.load(do_base + (q_start + rows)[:, None].to(tl.int64) * stride_ds + dims[None, :],
                                 mask=qtile, other=0.0)
                lse2 = tl.load(LSE2 + l_base + rows, mask=row_ok, other=float("inf"))
                delta = tl.load(DELTA + l_base + rows, mask=row_ok, other=0.0)
                s = _dot(q, tl.trans(k), None, UPCAST, PRECISION) * qk_scale  # (BM, BN)
                if need:
                    p_q = _positions(rows, row_ok, k_len - q_len, pos_ptr, k_len, PERMUTED)
                    keep = _keep_tile(p_q, p_k, span_row, valid_row, k_len, window, text_len,
                                      img_cols, dalle_half, CAUSAL, SPANS, WINDOW, DALLE, KEY_VALID)
                    s = tl.where(keep, s, float("-inf"))
                p = tl.exp2(s - lse2[:, None])
                dv = _dot(tl.trans(p).to(do.dtype), do, dv, UPCAST, PRECISION)
                ds = p * (_dot(do, tl.trans(v), None, UPCAST, PRECISION) - delta[:, None])
                dk = _dot(tl.trans(ds).to(q.dtype), q, dk, UPCAST, PRECISION)
        g_off = b.to(tl.int64) * stride_gkb + kvh.to(tl.int64) * stride_gkh \
            + (k_start + cols)[:, None].to(tl.int64) * stride_gks + dims[None, :]
        tl.store(DK + g_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=tile)
        tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=tile)


# --- launchers --------------------------------------------------------------------------------------

def _precision(dtype: torch.dtype) -> str:
    # float32 follows PyTorch's own matmul setting: exact unless the user allowed TF32.
    if dtype == torch.float32 and ieee_fp32_gemms(torch.device("cuda")):
        return "ieee"
    return "tf32"


def _tma_aligned(x: Tensor) -> bool:
    """TMA's alignment rule: unit last stride, base address and outer strides multiples of 16 bytes."""
    return x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(st * x.element_size() % 16 == 0
                                                                for st in x.stride()[:-1])


def _tma_ok(q: Tensor, k: Tensor, v: Tensor, varlen: bool) -> bool:
    """Whether Q, K and V can be read through TMA descriptors: a Hopper GPU (or the interpreter), dense
    (B, H, S, D) half-precision tensors that TMA can address, and a Triton that has host-side
    descriptors (the packed layout's sequences are no descriptor bounds). The backward also needs dO's."""
    if varlen or q.dtype not in (torch.float16, torch.bfloat16) or TensorDescriptor is None:
        return False
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] < 9:
        return False  # no TMA before Hopper
    return all(_tma_aligned(x) for x in (q, k, v))


def _descriptor(x: Tensor, bn: int, block_d: int):
    """A TMA descriptor of x (B, H, S, D) reading (1, 1, bn, block_d) blocks; zeros past S and D."""
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, 1, bn, block_d])


def column_major_order(mask, sq: int, sk: int, device) -> Optional[Tensor]:
    """For a DALL-E column mask over a whole sequence: token order with the image grid column-major
    (text first, unchanged), as positions (S,) int64; None for every other case."""
    if mask is None or mask.dalle is None or mask.dalle[3] != 2 or sq != sk:
        return None
    text_len, rows, cols = mask.dalle[:3]
    if sk != text_len + rows * cols or rows < 2 or cols < 2:
        return None
    grid = torch.arange(rows * cols, device=device).view(rows, cols).T.reshape(-1)  # column by column
    return torch.cat([torch.arange(text_len, device=device), text_len + grid])


class Problem:
    """Strides, sequence bounds and mask arguments of one call, shared by the forward and backward."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor],
                 max_q: int, max_k: int, mask, scale: float):
        self.varlen = cu_q is not None
        self.q, self.k, self.v = q, k, v
        if self.varlen:  # (T, H, D): batch stride 0, sequences from cu_seqlens
            self.batch, self.heads, self.kv_heads = cu_q.shape[0] - 1, q.shape[1], k.shape[1]
            self.sq, self.sk = max_q, max_k
        else:  # (B, H, S, D)
            self.batch, self.heads, self.kv_heads = q.shape[0], q.shape[1], k.shape[1]
            self.sq, self.sk = q.shape[2], k.shape[2]
        self.cu_q = cu_q if cu_q is not None else torch.zeros(1, dtype=torch.int32, device=q.device)
        self.cu_k = cu_k if cu_k is not None else self.cu_q
        self.head_dim = q.shape[-1]
        self.block_d = max(16, triton.next_power_of_2(self.head_dim))
        self.scale = scale
        self.mask = mask
        self.kind = tuning.mask_kind(mask)
        self.configs = {}  # pass -> tuning.Config, chosen on first use
        dummy = torch.zeros(1, dtype=torch.int32, device=q.device)
        spans = mask.span_ids if mask is not None and mask.span_ids is not None else dummy
        valid = mask.key_valid.view(torch.int8) if mask is not None and mask.key_valid is not None else dummy
        dalle = mask.dalle if mask is not None and mask.dalle is not None else (0, 1, 1, 0, 1)
        # DALL-E column layers: image tokens column-major, so that each column's tokens are contiguous
        # and the kept pairs block-sparse (row-major, every key tile holds a few of each column).
        self.perm = column_major_order(mask, self.sq, self.sk, q.device) if not self.varlen else None
        if self.perm is not None:
            self.inverse = torch.argsort(self.perm)
            self.q, self.k, self.v = (self.to_layout(x) for x in (q, k, v))
        positions = self.perm.to(torch.int32) if self.perm is not None else dummy
        # a TMA config runs with plain loads where this is False
        self.tma_ok = _tma_ok(self.q, self.k, self.v, self.varlen)
        self.mask_args = [spans, spans.stride(0) if spans.dim() == 2 else 0,
                          valid, valid.stride(0) if valid.dim() == 2 else 0,
                          mask.window if mask is not None and mask.window is not None else 0,
                          dalle[0], dalle[2], dalle[4] // 2, positions]
        self.flags = dict(HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, VARLEN=self.varlen,
                          CAUSAL=bool(mask is not None and mask.causal),
                          SPANS=mask is not None and mask.span_ids is not None,
                          WINDOW=mask is not None and mask.window is not None, DALLE=dalle[3],
                          KEY_VALID=mask is not None and mask.key_valid is not None, PERMUTED=self.perm is not None,
                          UPCAST=_INTERPRET and q.dtype == torch.bfloat16, PRECISION=_precision(q.dtype))

    def config(self, pass_: str, run) -> tuning.Config:
        """The launch config of "fwd" or "bwd"; run(config) launches the pass, for autotuning."""
        if pass_ not in self.configs:
            key = tuning.launch_key(pass_, self.q.dtype, self.head_dim, self.kind, self.flags["PRECISION"],
                                    max(self.sq, self.sk))
            self.configs[pass_] = tuning.CONFIGS[pass_].choose(key, run)
        return self.configs[pass_]

    def to_layout(self, x: Tensor) -> Tensor:
        """(B, H, S, D) in sequence order -> the kernels' token order (a copy when permuted)."""
        return x if self.perm is None else x.index_select(2, self.perm)

    def from_layout(self, x: Tensor) -> Tensor:
        return x if self.perm is None else x.index_select(2, self.inverse)

    def strides(self, x: Tensor) -> list:
        """(batch, head, token) strides; the packed layout has no batch stride."""
        return [0, x.stride(1), x.stride(0)] if self.varlen else [x.stride(0), x.stride(1), x.stride(2)]

    def lse_strides(self, lse: Tensor) -> list:
        return [0, lse.stride(0)] if self.varlen else [lse.stride(0), lse.stride(1)]

    def new_lse(self) -> Tensor:
        shape = (self.heads, self.q.shape[0]) if self.varlen else (self.batch, self.heads, self.sq)
        return _scratch.empty(*shape, dtype=torch.float32, device=self.q.device)

    def block_lists(self, bm: int, bn: int, by_key: bool):
        """(map args, HAS_MAP, MAP_PER_BATCH) for the kernels' block iteration."""
        if not blocks.needs_map(self.mask):
            dummy = self.cu_q
            return [dummy, dummy, dummy, 0, 0], False, False
        if self.varlen:
            bmap = blocks.block_map_varlen(self.mask, self.cu_q, self.cu_k, self.sq, self.sk, bm, bn)
        else:
            bmap = blocks.block_map(self.mask, self.sq, self.sk, bm, bn, self.q.device, self.perm)
        lists = bmap.by_key if by_key else bmap.by_query
        return [lists.index, lists.full, lists.count, lists.index.shape[1], lists.index.shape[2]], True, \
            bmap.per_batch


def forward(p: Problem, config: Optional[tuning.Config] = None) -> tuple[Tensor, Tensor]:
    """(out like q, lse2 float32: (B, H, Sq) dense or (H, Tq) packed). config: the launch config
    (default: tuning.py's choice)."""
    config = config or p.config("fwd", lambda c: _forward(p, c))
    out, lse2 = _forward(p, config)
    return p.from_layout(out), lse2


def _forward(p: Problem, config: tuning.Config) -> tuple[Tensor, Tensor]:
    """out in the kernels' token order, and lse2."""
    q, k, v = p.q, p.k, p.v
    out = _scratch.empty(*q.shape, dtype=q.dtype, device=q.device)
    lse2 = p.new_lse()
    bm, bn = config.bm, config.bn
    map_args, has_map, per_batch = p.block_lists(bm, bn, by_key=False)
    grid = (triton.cdiv(p.sq, bm), p.batch * p.heads)
    use_tma = config.tma and p.tma_ok
    k_desc, v_desc = (_descriptor(k, bn, p.block_d), _descriptor(v, bn, p.block_d)) if use_tma else (k, v)
    _attn_fwd[grid](q, k, v, out, lse2, k_desc, v_desc, p.scale * LOG2E, *p.strides(q), *p.strides(k), *p.strides(v),
                    *p.strides(out), *p.lse_strides(lse2), p.cu_q, p.cu_k, p.sq, p.sk, p.heads,
                    p.heads // p.kv_heads, *map_args, *p.mask_args, BM=bm, BN=bn, HAS_MAP=has_map,
                    MAP_PER_BATCH=per_batch, TMA=use_tma, **p.flags, **config.launch())
    return out, lse2


def backward(p: Problem, do: Tensor, out: Tensor, lse2: Tensor,
             config: Optional[tuning.Config] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) like q, k, v; deterministic. lse2 is in the kernels' token order, as forward left it.
    config: the launch config of both backward kernels (default: tuning.py's choice)."""
    do, out = p.to_layout(do), p.to_layout(out)
    delta = p.new_lse()
    _attn_bwd_delta[(triton.cdiv(p.sq, 64), p.batch * p.heads)](
        out, do, delta, *p.strides(out), *p.strides(do), *p.lse_strides(delta), p.cu_q, p.sq, p.heads,
        HEAD_DIM=p.head_dim, BLOCK_D=p.block_d, BM=64, VARLEN=p.varlen, num_warps=4 if not _INTERPRET else 1)
    config = config or p.config("bwd", lambda c: _backward(p, do, lse2, delta, c))
    dq, dk, dv = _backward(p, do, lse2, delta, config)
    return p.from_layout(dq), p.from_layout(dk), p.from_layout(dv)


def _backward(p: Problem, do: Tensor, lse2: Tensor, delta: Tensor, config: tuning.Config) -> tuple:
    """dQ, then dK and dV, in the kernels' token order; both kernels on config's tiles, whose block
    map they read by query and by key."""
    q, k, v = p.q, p.k, p.v
    bm, bn = config.bm, config.bn
    dq = _scratch.empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = _scratch.empty(*k.shape, dtype=k.dtype, device=k.device)
    dv = _scratch.empty(*v.shape, dtype=v.dtype, device=v.device)
    opts = config.launch()
    common = (p.scale * LOG2E, p.scale)
    use_tma = config.tma and p.tma_ok and _tma_aligned(do)
    kv_descs = (_descriptor(k, bn, p.block_d), _descriptor(v, bn, p.block_d)) if use_tma else (k, v)
    q_descs = (_descriptor(q, bm, p.block_d), _descriptor(do, bm, p.block_d)) if use_tma else (q, do)
    map_q, has_map, per_batch = p.block_lists(bm, bn, by_key=False)
    _attn_bwd_dq[(triton.cdiv(p.sq, bm), p.batch * p.heads)](
        q, k, v, do, dq, lse2, delta, *kv_descs, *common, *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do),
        *p.strides(dq), *p.lse_strides(lse2), p.cu_q, p.cu_k, p.sq, p.sk, p.heads, p.heads // p.kv_heads, *map_q, *p.mask_args,
        BM=bm, BN=bn, HAS_MAP=has_map, MAP_PER_BATCH=per_batch, TMA=use_tma, **p.flags, **opts)
    map_k, _, _ = p.block_lists(bm, bn, by_key=True)
    _attn_bwd_dkdv[(triton.cdiv(p.sk, bn), p.batch * p.kv_heads)](
        q, k, v, do, dk, dv, lse2, delta, *q_descs, *common, *p.strides(q), *p.strides(k), *p.strides(v), *p.strides(do),
        *p.strides(dk), *p.lse_strides(lse2), p.cu_q, p.cu_k, p.sq, p.sk, p.kv_heads, p.heads // p.kv_heads,
        *map_k, *p.mask_args, BM=bm, BN=bn, HAS_MAP=has_map, MAP_PER_BATCH=per_batch, TMA=use_tma, **p.flags,
        **opts)
    return dq, dk, dv
