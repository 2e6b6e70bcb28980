"""Fused linear + cross-entropy on a GPU; the math is in reference.py.

Rows go in chunks whose float32 logits take at most VLFAST_LCE_CHUNK_BYTES (default 32 MiB), but at
least MIN_CHUNK_ROWS rows: every chunk reads the whole weight twice, which must feed enough rows to
stay compute-bound. One buffer holds a chunk; per chunk:
  1. logits = hidden_c @ weight.T in float32 (cuBLAS, fp32 output, into the buffer; never rounded);
  2. _ce_rows_kernel, one program per row: online log-sum-exp over the vocabulary (with bias, softcap,
     label smoothing and z-loss), the row's loss and, when gradients are due, G = w * dLoss/dz in the
     input dtype, written over the row's own logits (a half-precision row fills the first half);
  3. d_hidden_c = G @ weight, d_weight += G^T @ hidden_c, d_bias += column sums of G.
For reduction "mean" / "sum" the gradients are computed in the forward (the upstream gradient is one
scalar, applied in the backward): three GEMMs of 2*N*H*V in all, the floor. For "none" the backward
recomputes the logits from the saved log-sum-exp (four GEMMs).
d_weight of a float32 weight accumulates in float32 (cuBLAS); of a half-precision one in scaled
float16 in its own memory (weight_grad.py). Extra memory: d_hidden, d_weight and one chunk.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _env, _scratch
from ..._gemm import addmm_f32_, mm_f32_into
from ..._launch_configs import KernelConfigs
from .reference import reduce, row_weights
from .weight_grad import ScaledHalfAccumulator, lse_bound, scale_for

# 32 MiB: with d_hidden and d_weight, 346 MiB extra at 8192 x 4096 x 32064 bf16 (the 0.35 GB goal).
CHUNK_BYTES = _env.positive_int("VLFAST_LCE_CHUNK_BYTES", 32 << 20)
MIN_CHUNK_ROWS = 256
# The row kernel is memory-bound: 8 warps stream a 2048-wide block of one row (8 floats a thread),
# on Triton's default 3 stages (what it has always launched with). One candidate: no measurement has
# asked for another, and a launch writes G over its logits, so it could not be timed as it stands.
_ROWS = [triton.Config({"BLOCK_V": 2048}, num_warps=8, num_stages=3)]
ROW_CONFIGS = KernelConfigs("linear_cross_entropy.rows", lambda key: _ROWS,
                            interpreter=triton.Config({"BLOCK_V": 128}, num_warps=1, num_stages=1))


@triton.jit
def _tanh(x):
    # triton.language has no tanh: exp(-2|x|) never overflows; a series keeps small |x| accurate.
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 - x2 * (17.0 / 315.0))))
    t = tl.where(ax < 0.1, small, big)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _cap(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _capped_logits(row_ptr, bias_ptr, cols, ok, softcap, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    z = tl.load(row_ptr + cols, mask=ok, other=0.0)
    if HAS_BIAS:
        z += tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return _cap(z, softcap, SOFTCAP)


@triton.jit
def _ce_rows_kernel(logits_ptr, stride_l, bias_ptr, targets_ptr, w_ptr, lse_ptr, loss_ptr, g_ptr, stride_g,
                    V, ignore_index, smoothing, softcap, z_loss,
                    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, COMPUTE_STATS: tl.constexpr,
                    WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    """One row of a chunk: lse and loss (COMPUTE_STATS; else lse is read), and w * dloss/dz (WRITE_GRAD)."""
    row = tl.program_id(0)
    t = tl.load(targets_ptr + row)
    kept = t != ignore_index
    row_ptr = logits_ptr + row.to(tl.int64) * stride_l
    lanes = tl.arange(0, BLOCK_V)
    if COMPUTE_STATS:
        # per-lane running max and sum of exp, merged at the end: no reduction inside the loop
        m = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        s = tl.zeros((BLOCK_V,), dtype=tl.float32)
        z_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes
            ok = cols < V
            z = _capped_logits(row_ptr, bias_ptr, cols, ok, softcap, HAS_BIAS, SOFTCAP)
            z = tl.where(ok, z, float("-inf"))
            m_new = tl.maximum(m, z)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_use) + tl.exp(z - m_use)
            m = m_new
            z_sum += tl.where(ok, z, 0.0)
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
        t_safe = tl.where(kept, t, 0)
        z_t = tl.load(row_ptr + t_safe)
        if HAS_BIAS:
            z_t += tl.load(bias_ptr + t_safe).to(tl.float32)
        z_t = _cap(z_t, softcap, SOFTCAP)
        loss = (1.0 - smoothing) * (lse - z_t) + smoothing * (lse - tl.sum(z_sum, axis=0) / V) + z_loss * lse * lse
        tl.store(lse_ptr + row, lse)
        tl.store(loss_ptr + row, tl.where(kept, loss, 0.0))
    else:
        lse = tl.load(lse_ptr + row)
    if WRITE_GRAD:
        w = tl.where(kept, tl.load(w_ptr + row), 0.0)
        zl_coef = 2.0 * z_loss * lse
        g_row = g_ptr + row.to(tl.int64) * stride_g
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes
            ok = cols < V
            z = _capped_logits(row_ptr, bias_ptr, cols, ok, softcap, HAS_BIAS, SOFTCAP)
            p = tl.exp(z - lse)
            # term by term (as autograd would): the CE part is exactly 0 where p is one-hot
            g = (1.0 - smoothing) * (p - tl.where(cols == t, 1.0, 0.0)) + smoothing * (p - 1.0 / V) + zl_coef * p
            if SOFTCAP:
                capped = z / softcap
                g = g * (1.0 - capped * capped)
            # G overwrites this row's logits: a half-precision block lands on logits this block or
            # an earlier one read, so every thread must have read this block before any writes it.
            tl.debug_barrier()
            tl.store(g_row + cols, (w * g).to(g_ptr.dtype.element_ty), mask=ok)


def _chunk_rows(n: int, v: int) -> int:
    rows = max(MIN_CHUNK_ROWS, CHUNK_BYTES // max(1, 4 * v) // 64 * 64)
    return max(1, min(rows, n))


def _grad_view(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """G (C, V) in `dtype` over the logits buffer (C, V) float32: row i in the first bytes of row i
    (the rest of the row is left as it was: see _launch_rows for CPU BLAS)."""
    if dtype == logits.dtype:
        return logits
    return logits.view(dtype)[:, :logits.shape[1]]  # row stride 2V: 2-byte G in a 4-byte row


def _launch_rows(logits, bias, targets, w, lse, loss, g, v, ignore_index, smoothing, softcap, z_loss,
                 compute_stats: bool):
    rows = logits.shape[0]
    dummy = lse  # pointer for arguments a variant never reads
    config = ROW_CONFIGS.choose(())
    _ce_rows_kernel[(rows,)](logits, logits.stride(0), bias if bias is not None else dummy, targets,
                             w if w is not None else dummy, lse, loss if loss is not None else dummy,
                             g if g is not None else dummy, g.stride(0) if g is not None else 0,
                             v, ignore_index, smoothing, softcap or 1.0, z_loss,
                             HAS_BIAS=bias is not None, SOFTCAP=bool(softcap), COMPUTE_STATS=compute_stats,
                             WRITE_GRAD=g is not None, **config.kwargs, num_warps=config.num_warps,
                             num_stages=config.num_stages)
    if g is not None and g.device.type == "cpu" and g.stride(0) > v:
        # The rest of each row still holds float32 logits, whose low halves can read as bfloat16
        # inf / NaN. CPU BLAS's bfloat16 GEMM reads a row of A on past K (97 columns: up to 128,
        # within the row stride) and multiplies that by zero, so one such value made a whole row of
        # d_hidden NaN. cuBLAS and the d_weight kernel read only the V columns: the GPU skips this.
        logits.view(g.dtype)[:, v:].zero_()


class _Grads:
    """The gradient buffers of one call and how each chunk's G feeds them.

    w_rows: the rows' weights in G; lse: the rows' log-sum-exp when known (the backward), else None
    (both for the scale of the half-precision d_weight accumulator)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], need: tuple[bool, bool, bool],
                 w_rows: Tensor, softcap: float, z_loss: float, lse: Optional[Tensor] = None):
        n, h = hidden.shape
        v = weight.shape[0]
        self.need = need
        self.dh = _scratch.empty(n if need[0] else 0, h, dtype=hidden.dtype, device=hidden.device)
        self.dw = self.dw_half = None
        if need[1] and weight.dtype == torch.float32:
            self.dw = torch.zeros(v, h, device=weight.device, dtype=torch.float32)
        elif need[1]:
            bound = None if not z_loss else (lse_bound(hidden, weight, bias, softcap) if lse is None
                                             else torch.linalg.vector_norm(lse, ord=math.inf))
            self.dw_half = ScaledHalfAccumulator(v, h, weight.dtype, weight.device,
                                                 scale_for(hidden, w_rows, z_loss, bound))
        self.db = torch.zeros(v if need[2] else 0, dtype=torch.float32, device=weight.device)

    def add_chunk(self, g: Tensor, hidden_c: Tensor, weight: Tensor, r0: int) -> None:
        if self.need[0]:
            torch.mm(g, weight, out=self.dh[r0:r0 + g.shape[0]])
        if self.dw is not None:
            addmm_f32_(self.dw, g.T, hidden_c)
        if self.dw_half is not None:
            self.dw_half.add(g, hidden_c)
        if self.need[2]:
            self.db += g.sum(dim=0, dtype=torch.float32)

    def result(self, weight: Tensor):
        if self.dw_half is not None:
            dw = self.dw_half.result()
        else:
            dw = self.dw if self.dw is not None else weight.new_empty(0, weight.shape[1])
        return self.dh, dw, self.db.to(weight.dtype)


def _chunks(hidden: Tensor, weight: Tensor):
    """(r0, r1, logits (r1 - r0, V) float32) per chunk, the logits in one reused buffer."""
    n = hidden.shape[0]
    v = weight.shape[0]
    rows = _chunk_rows(n, v)
    buf = _scratch.empty(rows, v, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        yield r0, r1, mm_f32_into(buf[:r1 - r0], hidden[r0:r1], weight.T)


def forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], ignore_index: int,
            label_smoothing: float, softcap: float, z_loss: float, reduction: str, need: tuple[bool, bool, bool]):
    """(loss, lse (N,), d_hidden, d_weight, d_bias); the gradients only for mean / sum with `need` set."""
    n = hidden.shape[0]
    v = weight.shape[0]
    eager = reduction != "none" and any(need)
    lse = _scratch.empty(n, dtype=torch.float32, device=hidden.device)
    rows = _scratch.empty(n, dtype=torch.float32, device=hidden.device)
    w_rows = row_weights(targets, ignore_index, reduction) if eager else None
    grads = _Grads(hidden, weight, bias, need if eager else (False, False, False), w_rows, softcap, z_loss)
    for r0, r1, logits in _chunks(hidden, weight):
        g = _grad_view(logits, hidden.dtype) if eager else None
        _launch_rows(logits, bias, targets[r0:r1], w_rows[r0:r1] if eager else None, lse[r0:r1], rows[r0:r1],
                     g, v, ignore_index, label_smoothing, softcap, z_loss, compute_stats=True)
        if eager:
            grads.add_chunk(g, hidden[r0:r1], weight, r0)
    return (reduce(rows, targets, ignore_index, reduction), lse) + grads.result(weight)


def backward(grad_rows: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
             lse: Tensor, ignore_index: int, label_smoothing: float, softcap: float, z_loss: float,
             need: tuple[bool, bool, bool]):
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows_i * loss_i, recomputing each chunk's logits."""
    v = weight.shape[0]
    w_rows = grad_rows.float()
    grads = _Grads(hidden, weight, bias, need, w_rows, softcap, z_loss, lse)
    for r0, r1, logits in _chunks(hidden, weight):
        g = _grad_view(logits, hidden.dtype)
        _launch_rows(logits, bias, targets[r0:r1], w_rows[r0:r1], lse[r0:r1], None, g, v, ignore_index,
                     label_smoothing, softcap, z_loss, compute_stats=False)
        grads.add_chunk(g, hidden[r0:r1], weight, r0)
    return grads.result(weight)
