"""The contrastive loss as a composition of PyTorch's own kernels: impl="torch", the CPU fast path.

Same math as reference.py (margin form: row_i = softplus(logsumexp over negatives of z_ij - z_ii)),
organised for speed: per chunk of rows one GEMM in the compute dtype (float32, float64 for float64;
bf16/fp16 features are upcast once; bf16-valued float32 GEMMs run in oneDNN's bf16 mode, exact
products accumulated in float32, see bf16_valued_fp32_gemms), then
in-place elementwise passes on that one buffer. Extra memory: at most three chunk buffers of
CHUNK_ELEMENTS each plus O((N + M) D); never N x M unless that fits one chunk.

Shapes: a (N, D), b (M, D), scale / bias 0-d, stats (3, N) as in reference.py.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import compute_dtype, softplus

# Elements of one chunk buffer (16 MiB at float32); tests shrink it to force several chunks.
CHUNK_ELEMENTS = 1 << 22


@contextlib.contextmanager
def bf16_valued_fp32_gemms(active: bool):
    """float32 GEMMs in oneDNN's bf16 mode while inside, for float32 operands that hold bfloat16 values.

    Such operands convert to bf16 exactly, so each product is exact and the sum accumulates in
    float32 into a float32 result: the float32 GEMM's answer (within its rounding), about 3x faster
    on CPUs with bf16 instructions (measured here: 2048 x 2048 x 512, 21 ms -> 7 ms). The setting is
    process-wide; it is restored on exit.
    """
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if not active or matmul is None or not hasattr(matmul, "fp32_precision"):
        yield
        return
    old = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = old


def _chunk_rows(m: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(m, 1))


def _positives(t: Tensor, r0: int, offset: int) -> Tensor:
    """View (C,) of chunk t's entries (i, i + offset) for its rows r0 .. r0 + C - 1."""
    return t.diagonal(offset=r0 + offset)[: t.shape[0]]


def forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str, symmetric: bool,
            offset: int) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and stats (3, N) in the compute dtype."""
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    bf16_values = a.dtype == torch.bfloat16
    a, b = a.to(ct), b.to(ct)
    stats = torch.zeros(3, n, dtype=ct, device=a.device)
    step = _chunk_rows(m)
    buf = torch.empty(min(step, n), m, dtype=ct, device=a.device)
    if kind == "softmax":
        # The bias shifts every logit of a row and its positive alike: the margins do not see it.
        col_nlse = torch.full((m,), float("-inf"), dtype=ct, device=a.device) if symmetric else None
        pos = s * (a * b[offset:offset + n]).sum(dim=1)  # every row's positive, before any chunk needs it
        stats[0] = pos
        for r0 in range(0, n, step):
            c = min(step, n - r0)
            with bf16_valued_fp32_gemms(bf16_values):
                t = torch.mm(a[r0:r0 + c], b.T, out=buf[:c]).mul_(s)
            _positives(t, r0, offset).fill_(float("-inf"))
            # logsumexp_j (t_ij - pos_i) = logsumexp_j t_ij - pos_i: the row's max is a negative close
            # to pos_i in the near-perfect case, so the subtraction loses nothing there.
            stats[1, r0:r0 + c] = softplus(torch.logsumexp(t, dim=1) - pos[r0:r0 + c])
            if symmetric:
                col_nlse = torch.logaddexp(col_nlse, torch.logsumexp(t, dim=0))
        if symmetric:
            col_nlse -= pos
        if bias is not None:
            stats[0] += bias.to(ct)
        if not symmetric:
            return stats[1].clone(), stats
        stats[2] = softplus(col_nlse)
        return (stats[1] + stats[2]) / 2, stats
    bias_c = bias.to(ct) if bias is not None else None
    for r0 in range(0, n, step):
        c = min(step, n - r0)
        with bf16_valued_fp32_gemms(bf16_values):
            t = torch.mm(a[r0:r0 + c], b.T, out=buf[:c]).mul_(s)
        if bias_c is not None:
            t.add_(bias_c)
        if offset >= 0:  # softplus(-z) at the positive, softplus(z) elsewhere
            _positives(t, r0, offset).neg_()
        stats[1, r0:r0 + c] = F.softplus(t).sum(dim=1)
    return stats[1].clone(), stats


def backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], stats: Tensor,
             kind: str, symmetric: bool, offset: int, need_a: bool = True,
             need_b: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_a, d_b, d_scale, d_bias) of sum_i grad_i * loss_i; d_a / d_b empty (0, D) when not needed.

    Per chunk: dot = a_c @ b^T, G = dLoss/dz (reference.logit_grad_chunk's formula, in place),
    d_scale += <G, dot>, d_a = s G @ b, d_b += s G^T @ a_c (for bfloat16 features: s G rounded to
    bfloat16, as the GPU paths do, and bfloat16 GEMMs accumulating in float32; d_b summed in float32).
    """
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    a_c, b_c = a.to(ct), b.to(ct)
    stats = stats.to(ct)
    bf16_gemms = a.dtype == torch.bfloat16
    da = torch.empty(n if need_a else 0, a.shape[1], dtype=a.dtype if bf16_gemms else ct, device=a.device)
    db = torch.zeros(m if need_b else 0, b.shape[1], dtype=ct, device=a.device)
    dscale = torch.zeros((), dtype=ct, device=a.device)
    dbias = torch.zeros((), dtype=ct, device=a.device)
    step = _chunk_rows(m)
    rows = min(step, n)
    dot_buf = torch.empty(rows, m, dtype=ct, device=a.device)
    g_buf = torch.empty(rows, m, dtype=ct, device=a.device)
    q_buf = torch.empty(rows, m, dtype=ct, device=a.device) if kind == "softmax" and symmetric else None
    if kind == "softmax":
        w = grad.to(ct) * (0.5 if symmetric else 1.0)
        # z - bias at the positive, plus the loss: exp(s dot - shift) is the softmax probability.
        pos = stats[0] - bias.to(ct) if bias is not None else stats[0]
        row_shift = pos + stats[1]
        col_shift = pos + stats[2]
        row_em = torch.expm1(-stats[1]) * w
        col_em = torch.expm1(-stats[2]) * w
    else:
        w = grad.to(ct)
        bias_c = bias.to(ct) if bias is not None else None
    for r0 in range(0, n, step):
        c = min(step, n - r0)
        ar = a_c[r0:r0 + c]
        with bf16_valued_fp32_gemms(bf16_gemms):
            dot = torch.mm(ar, b_c.T, out=dot_buf[:c])
        g = torch.mul(dot, s, out=g_buf[:c])
        if kind == "softmax":
            if symmetric:
                q = torch.sub(g, col_shift[None, :], out=q_buf[:c]).exp_().mul_(w[None, :])
            g.sub_(row_shift[r0:r0 + c, None]).exp_().mul_(w[r0:r0 + c, None])
            diag = _positives(g, r0, offset)
            diag.copy_(row_em[r0:r0 + c])
            if symmetric:
                _positives(q, r0, offset).copy_(col_em[r0:r0 + c])
                g.add_(q)
        else:
            if bias_c is not None:
                g.add_(bias_c)
            if offset >= 0:
                _positives(g, r0, offset).neg_()
            # d softplus(u)/du = sigmoid(u), and u = -z at the positive
            g.sigmoid_().mul_(w[r0:r0 + c, None])
            if offset >= 0:
                _positives(g, r0, offset).neg_()
            dbias += g.sum()
        dscale += dot.mul_(g).sum()  # torch.sum's cascade summation: dot's fp32 sum lost ~1e-5 here
        if bf16_gemms:
            # s G rounded to bfloat16 (as the GPU paths' G chunk), GEMMs with float32 accumulation:
            # on CPUs with bf16 instructions these are several times faster than float32 ones.
            g_lp = g.mul_(s).to(torch.bfloat16)
            if need_a:
                torch.mm(g_lp, b, out=da[r0:r0 + c])
            if need_b:
                db.add_(torch.mm(g_lp.T, a[r0:r0 + c]))
            continue
        if need_a:
            torch.mm(g, b_c, out=da[r0:r0 + c]).mul_(s)
        if need_b:
            db.addmm_(g.T, ar)
    if need_b and not bf16_gemms:
        db.mul_(s)
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias
