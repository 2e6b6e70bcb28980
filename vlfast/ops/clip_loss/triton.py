"""Triton kernels for the contrastive loss; the math is in reference.py.

Forward, one pass over the logits (the N x M matrix is never stored):
  _positive_logit_kernel  z at each row's positive, (N,)
  _logit_stats_kernel     per (row block, column split): the row statistic over its columns and,
                          for the symmetric softmax, a per-row-block partial column statistic;
                          softmax keeps log-sum-exp of the margins z - z_positive over negatives,
                          sigmoid the sum of softplus terms. Partials are combined in PyTorch
                          (partials.py, shared with the CUDA kernels): O(N * splits + M * N / BLOCK_M) floats.
Backward, per chunk of rows (bounded extra memory):
  _logit_grad_kernel      recomputes the logits tile and writes s * dLoss/dz (C x M, input dtype),
                          plus per-tile partial sums for d_scale and d_bias in float32;
  two GEMMs on the chunk  d_a = G @ b (cuBLAS) and d_b += G^T @ a into a float32 accumulator.
That is 4 GEMMs of 2*N*M*D in all: the floor for a loss whose column statistics need every row.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._backends import triton_interpreting
from ..._gemm import ieee_fp32_gemms
from ..._launch_configs import KernelConfigs, chosen
from . import partials

_INTERPRET = triton_interpreting()
# Column splits are multiples of the widest column tile, so every config tiles them exactly.
_MAX_BN = 128
# The backward's G chunk size in bytes (None: partials.grad_chunk_rows' default); tests shrink it.
GRAD_CHUNK_BYTES = partials.GRAD_CHUNK_BYTES


def _configs(bm, bn_choices, bk, warps, stage_choices):
    return [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=warps, num_stages=s)
            for bn in bn_choices for s in stage_choices]


# Two families, the first config of each the default (vlfast/_launch_configs.py times all of a
# family with VLFAST_AUTOTUNE=1; each costs a compile). Tensor cores (fp16, bf16, fp32 as TF32):
# 128 x 128 tiles on 8 warps pipeline 3-4 stages on wgmma without spills in ahead-of-time compiles
# for sm_90a (tests/tools/triton_aot.py); 128 x 256 spills 1-3 KB. Exact fp32 runs on the FMA units,
# where 128 x 128 spills ~9 KB: smaller tiles. To be narrowed by measurement on the H200.
_TENSOR_CORE = _configs(128, [128, 64], 64, 8, [3, 4])
_EXACT_FP32 = _configs(64, [64, 32], 32, 4, [3, 2])
# The interpreter: one small config (it is slow, and several tiles get exercised).
_INTERPRETER = triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4, num_stages=1)


def launch_key(dtype: torch.dtype, d: int, kind: str, symmetric: bool, precision: str) -> tuple:
    """The key both kernels' configs are chosen by; its last element, the dot precision, picks the family."""
    return (str(dtype).replace("torch.", ""), d, kind, symmetric, precision)


def _family(key: tuple) -> list:
    return _EXACT_FP32 if key[-1] == "ieee" else _TENSOR_CORE


STATS_CONFIGS = KernelConfigs("clip_loss.stats", _family, interpreter=_INTERPRETER)
GRAD_CONFIGS = KernelConfigs("clip_loss.grad", _family, interpreter=_INTERPRETER)


def _even_k(args):
    return args["D"] % args["BK"] == 0


@triton.jit
def _log1p(x):
    # log(1 + x) accurate for tiny x (Goldberg's trick); triton.language has no log1p.
    u = 1.0 + x
    d = tl.where(u == 1.0, 1.0, u - 1.0)
    return tl.where(u == 1.0, x, tl.log(u) * (x / d))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
              BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr,
              DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """<a_row, b_col> for a BM x BN tile, float32 accumulation."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    ks = tl.arange(0, BK)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_cols = b_ptr + cols.to(tl.int64)[None, :] * stride_b
    for k0 in range(0, D, BK):
        k = k0 + ks
        if EVEN_K:
            a = tl.load(a_rows + k[None, :], mask=row_ok[:, None], other=0.0)
            bt = tl.load(b_cols + k[:, None], mask=col_ok[None, :], other=0.0)
        else:
            a = tl.load(a_rows + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
            bt = tl.load(b_cols + k[:, None], mask=col_ok[None, :] & (k[:, None] < D), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact there
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _logits(dot, scale_ptr, bias_ptr, HAS_BIAS: tl.constexpr):
    z = tl.load(scale_ptr) * dot
    if HAS_BIAS:
        z += tl.load(bias_ptr)
    return z


@triton.jit
def _positives(rows, cols, offset, HAS_POS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """(BM, BN) bool: True where column == row + offset."""
    is_pos = tl.zeros((BM, BN), dtype=tl.int1)
    if HAS_POS:
        is_pos = cols[None, :] == rows[:, None] + offset
    return is_pos


@triton.jit
def _positive_logit_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, out_ptr, N, D, offset, stride_a, stride_b,
                           HAS_BIAS: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < N
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_rows = b_ptr + (rows + offset).to(tl.int64)[:, None] * stride_b
    acc = tl.zeros((BR,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        k = d0 + tl.arange(0, BD)
        m = ok[:, None] & (k[None, :] < D)
        x = tl.load(a_rows + k[None, :], mask=m, other=0.0).to(tl.float32)
        y = tl.load(b_rows + k[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * y, axis=1)
    z = tl.load(scale_ptr) * acc
    if HAS_BIAS:
        z += tl.load(bias_ptr)
    tl.store(out_ptr + rows, z, mask=ok)


@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _logit_stats_kernel(a_ptr, b_ptr, scale_ptr, bias_ptr, pos_ptr, row_part_ptr, col_part_ptr,
                        N, M, D, offset, cols_per_split, stride_a, stride_b,
                        SIGMOID: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                        HAS_POS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                        EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    if not SIGMOID:
        pos_r = tl.load(pos_ptr + rows, mask=row_ok, other=0.0)
    # softmax: running max and sum of exp(margin - max) over negatives; sigmoid: running sum.
    m_r = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_r = tl.zeros((BM,), dtype=tl.float32)
    col_start = pid_s * cols_per_split
    col_end = tl.minimum(M, col_start + cols_per_split)
    for c0 in range(col_start, col_end, BN):
        cols = c0 + tl.arange(0, BN)
        col_ok = cols < col_end
        dot = _dot_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_a, stride_b,
                        BM, BN, BK, EVEN_K, DOT_PRECISION, UPCAST)
        z = _logits(dot, scale_ptr, bias_ptr, HAS_BIAS)
        valid = row_ok[:, None] & col_ok[None, :]
        is_pos = _positives(rows, cols, offset, HAS_POS, BM, BN)
        if SIGMOID:
            x = tl.where(is_pos, -z, z)  # softplus(-t z): t = +1 at the positive, -1 elsewhere
            l_r += tl.sum(tl.where(valid, _softplus(x), 0.0), axis=1)
        else:
            keep = valid & (is_pos == 0)
            t = tl.where(keep, z - pos_r[:, None], float("-inf"))
            m_new = tl.maximum(m_r, tl.max(t, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_r = l_r * tl.exp(m_r - m_use) + tl.sum(tl.exp(t - m_use[:, None]), axis=1)
            m_r = m_new
            if SYMMETRIC:  # the same tile, read down its columns (square block: column j's positive is row j)
                pos_c = tl.load(pos_ptr + cols, mask=col_ok, other=0.0)
                tc = tl.where(keep, z - pos_c[None, :], float("-inf"))
                mc = tl.max(tc, axis=0)
                mc_use = tl.where(mc == float("-inf"), 0.0, mc)
                lc = tl.sum(tl.exp(tc - mc_use[None, :]), axis=0)
                # lc is 0 (no negatives) or >= 1 (the max contributes exp(0)), so the log is exact.
                part = tl.where(lc > 0.0, mc_use + tl.log(tl.maximum(lc, 1.0)), float("-inf"))
                tl.store(col_part_ptr + pid_m.to(tl.int64) * M + cols, part, mask=col_ok)
    if SIGMOID:
        out = l_r
    else:
        m_use = tl.where(m_r == float("-inf"), 0.0, m_r)
        out = tl.where(l_r > 0.0, m_use + tl.log(tl.maximum(l_r, 1.0)), float("-inf"))
    tl.store(row_part_ptr + pid_s.to(tl.int64) * N + rows, out, mask=row_ok)


@triton.heuristics({"EVEN_K": _even_k})
@triton.jit
def _logit_grad_kernel(a_ptr, b_ptr, g_ptr, scale_ptr, bias_ptr, stats_ptr, em_ptr, w_ptr, ds_part_ptr,
                       db_part_ptr, C, N, M, D, r0, offset, stride_a, stride_b, stride_g,
                       SIGMOID: tl.constexpr, SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HAS_POS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """G = scale * dLoss/dz for rows [r0, r0 + C) of a (a_ptr points at row r0) against all of b."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local = pid_m * BM + tl.arange(0, BM)
    row_ok = local < C
    rows = r0 + local
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < M
    dot = _dot_tile(a_ptr, b_ptr, local, cols, row_ok, col_ok, D, stride_a, stride_b,
                    BM, BN, BK, EVEN_K, DOT_PRECISION, UPCAST)
    z = _logits(dot, scale_ptr, bias_ptr, HAS_BIAS)
    valid = row_ok[:, None] & col_ok[None, :]
    is_pos = _positives(rows, cols, offset, HAS_POS, BM, BN)
    w_r = tl.load(w_ptr + rows, mask=row_ok, other=0.0)
    if SIGMOID:
        # d softplus(-t z)/dz = -t sigmoid(-t z), t = +1 at the positive; exp(-|x|) never overflows
        x = tl.where(is_pos, z, -z)
        e = tl.exp(-tl.abs(x))
        sig = tl.where(x >= 0.0, e / (1.0 + e), 1.0 / (1.0 + e))  # sigmoid(-x)
        g = w_r[:, None] * tl.where(is_pos, -sig, sig)
    else:
        pos_r = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        loss_r = tl.load(stats_ptr + N + rows, mask=row_ok, other=0.0)
        em_r = tl.load(em_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(z - pos_r[:, None] - loss_r[:, None])
        g = w_r[:, None] * tl.where(is_pos, em_r[:, None], p)  # softmax - 1 = expm1(-loss) at the positive
        if SYMMETRIC:
            pos_c = tl.load(stats_ptr + cols, mask=col_ok, other=0.0)
            loss_c = tl.load(stats_ptr + 2 * N + cols, mask=col_ok, other=0.0)
            em_c = tl.load(em_ptr + N + cols, mask=col_ok, other=0.0)
            w_c = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
            q = tl.exp(z - pos_c[None, :] - loss_c[None, :])
            g += w_c[None, :] * tl.where(is_pos, em_c[None, :], q)
    g = tl.where(valid, g, 0.0)
    pid = pid_m * tl.num_programs(1) + pid_n
    tl.store(ds_part_ptr + pid, tl.sum(tl.sum(g * dot, axis=1), axis=0))
    if SIGMOID:
        tl.store(db_part_ptr + pid, tl.sum(tl.sum(g, axis=1), axis=0))
    out = g_ptr + local.to(tl.int64)[:, None] * stride_g + cols[None, :]
    tl.store(out, (tl.load(scale_ptr) * g).to(g_ptr.dtype.element_ty), mask=valid)


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 follows PyTorch's own matmul setting: exact unless the user allowed TF32.
    if dtype == torch.float32 and ieee_fp32_gemms(torch.device("cuda")):
        return "ieee"
    return "tf32"


def _flags(a: Tensor, bias: Optional[Tensor], kind: str, symmetric: bool, offset: int) -> dict:
    return dict(SIGMOID=kind == "sigmoid", SYMMETRIC=symmetric, HAS_BIAS=bias is not None,
                HAS_POS=offset >= 0, DOT_PRECISION=_dot_precision(a.dtype),
                UPCAST=_INTERPRET and a.dtype != torch.float32)


def forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str, symmetric: bool,
            offset: int) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) float32 and stats (3, N): [z at the positive, row loss, column loss]."""
    n, d = a.shape
    m = b.shape[0]
    flags = _flags(a, bias, kind, symmetric, offset)
    bias_arg = bias if bias is not None else scale  # never read when HAS_BIAS is False

    def stats_pass(config) -> tuple:
        """The forward's kernels on one config, into partials sized for its row blocks."""
        row_blocks = triton.cdiv(n, config.kwargs["BM"])
        splits, cols_per_split = partials.column_splits(row_blocks, m, a.device, _MAX_BN)
        stats, row_part, col_part = partials.forward_partials(n, m, row_blocks, splits, symmetric, a.device)
        if kind == "softmax":
            _positive_logit_kernel[(triton.cdiv(n, 64),)](a, b, scale, bias_arg, stats[0], n, d, offset,
                                                          a.stride(0), b.stride(0), HAS_BIAS=bias is not None,
                                                          BR=64, BD=64)
        col_arg = col_part if symmetric else row_part  # a placeholder pointer when there is no column direction
        _logit_stats_kernel[(row_blocks, splits)](a, b, scale, bias_arg, stats[0], row_part, col_arg, n, m, d,
                                                  offset, cols_per_split, a.stride(0), b.stride(0), **flags,
                                                  **config.kwargs,
                                                  num_warps=config.num_warps, num_stages=config.num_stages)
        return stats, row_part, col_part

    config = STATS_CONFIGS.choose(launch_key(a.dtype, d, kind, symmetric, flags["DOT_PRECISION"]), stats_pass)
    return partials.combine_forward(*stats_pass(config), kind, symmetric)


def backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], stats: Tensor,
             kind: str, symmetric: bool, offset: int, need_a: bool, need_b: bool):
    """(d_a, d_b, d_scale, d_bias) of sum_i grad_i * loss_i."""
    n, d = a.shape
    m = b.shape[0]
    flags = _flags(a, bias, kind, symmetric, offset)
    bias_arg = bias if bias is not None else scale
    chunk = partials.grad_chunk_rows(n, m, d, a.element_size(), GRAD_CHUNK_BYTES)
    most_programs = triton.cdiv(chunk, 32) * triton.cdiv(m, 32)  # the smallest tile any config uses
    key = launch_key(a.dtype, d, kind, symmetric, flags["DOT_PRECISION"])

    def launch(r0, c, g, w, em, ds_part, db_part):
        def grad_pass(config, ds_out, db_out):  # writes g and one partial sum per program
            bm, bn = config.kwargs["BM"], config.kwargs["BN"]
            _logit_grad_kernel[(triton.cdiv(c, bm), triton.cdiv(m, bn))](
                a[r0:r0 + c], b, g, scale, bias_arg, stats, em, w, ds_out, db_out, c, n, m, d, r0, offset,
                a.stride(0), b.stride(0), g.stride(0), **flags, **config.kwargs,
                num_warps=config.num_warps, num_stages=config.num_stages)

        spare = []  # timed candidates' partial sums: one with more programs than the winner would
        # leave entries in ds_part / db_part that the winner does not overwrite

        def timed(config):
            spare.extend([] if spare else [torch.empty_like(ds_part), torch.empty_like(db_part)])
            grad_pass(config, *spare)

        grad_pass(GRAD_CONFIGS.choose(key, timed), ds_part, db_part)

    return partials.backward(grad, a, b, stats, symmetric, need_a, need_b, chunk, most_programs, launch)


def tuned_configs() -> dict:
    """The configs chosen so far, per kernel and key (for benchmark reports; vlfast/_launch_configs.py)."""
    return chosen("clip_loss.")
