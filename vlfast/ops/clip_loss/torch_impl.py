"""The contrastive loss as a composition of PyTorch's own kernels: impl="torch", the CPU fast path.

Same math as reference.py (margin form: row_i = softplus(logsumexp over negatives of z_ij - z_ii)),
organised for speed: per chunk of rows one GEMM in the compute dtype (float32, float64 for float64;
bf16/fp16 features are upcast once; bf16-valued float32 GEMMs run in oneDNN's bf16 mode, exact
products accumulated in float32, see bf16_valued_fp32_gemms), then in-place elementwise passes on
that one buffer. When one chunk holds every row, the forward keeps the raw products a @ b^T in the
storage of its stats (which autograd saves for the backward), so the backward skips that GEMM.
Extra memory: at most three chunk buffers of CHUNK_ELEMENTS each plus O((N + M) D); never N x M
unless that fits one chunk.

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

# The backward builds the column softmax from the row one, exp(t - col_j) = exp(t - row_i) *
# exp(row_i - top) * exp(top - col_j) (top = the largest row log-sum-exp), when every column's
# log-sum-exp is within this many nats of top: a factor that underflows then stands for a term below
# e^-47, nothing next to the ones kept. Past it (a text far from every image) it exponentiates twice.
MAX_COLUMN_GAP = 40.0


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


def _stats_and_dots(n: int, m: int, ct: torch.dtype, device, keep_dots: bool) -> tuple[Tensor, Optional[Tensor]]:
    """stats (3, N) zeros and, if keep_dots, a (N, M) buffer for a @ b^T right after them in one storage.

    stats is a plain (non-view) tensor on that storage: autograd saves it for the backward, which
    finds the products there (saved_dots), so they live exactly as long as the graph does.
    """
    if not keep_dots:
        return torch.zeros(3, n, dtype=ct, device=device), None
    storage = torch.empty(3 * n + n * m, dtype=ct, device=device).untyped_storage()
    stats = torch.empty(0, dtype=ct, device=device).set_(storage, 0, (3, n), (n, 1)).zero_()
    return stats, stats.as_strided((n, m), (m, 1), 3 * n)


def saved_dots(stats: Tensor, m: int) -> Optional[Tensor]:
    """The forward's a @ b^T (N, M) kept behind stats, or None (several chunks, or stats was copied)."""
    n = stats.shape[1]
    whole = (3 * n + n * m) * stats.element_size()
    if stats.storage_offset() != 0 or not stats.is_contiguous() or stats.untyped_storage().nbytes() != whole:
        return None
    return stats.as_strided((n, m), (m, 1), 3 * n)


def forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str, symmetric: bool,
            offset: int) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and stats (3, N) in the compute dtype."""
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    bf16_values = a.dtype == torch.bfloat16
    a, b = a.to(ct), b.to(ct)
    step = _chunk_rows(m)
    stats, dots = _stats_and_dots(n, m, ct, a.device, keep_dots=step >= n)
    buf = torch.empty(min(step, n), m, dtype=ct, device=a.device)

    def logits(r0: int, c: int) -> Tensor:
        """s * a[r0:r0 + c] @ b^T in buf (the products themselves kept in dots when there is one chunk)."""
        with bf16_valued_fp32_gemms(bf16_values):
            if dots is None:
                return torch.mm(a[r0:r0 + c], b.T, out=buf[:c]).mul_(s)
            return torch.mul(torch.mm(a, b.T, out=dots), s, out=buf)

    if kind == "softmax":
        # The bias shifts every logit of a row and its positive alike: the margins do not see it.
        col_nlse = torch.full((m,), float("-inf"), dtype=ct, device=a.device) if symmetric else None
        pos = s * (a * b[offset:offset + n]).sum(dim=1)  # every row's positive, before any chunk needs it
        stats[0] = pos
        for r0 in range(0, n, step):
            c = min(step, n - r0)
            t = logits(r0, c)
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
        t = logits(r0, c)
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

    Per chunk: dot = a_c @ b^T (or the forward's, when kept), G = dLoss/dz (reference.logit_grad_chunk's
    formula), then Gb = G @ b and d_b += G^T @ a_c; d_a = s Gb, d_b = s (sum), and
    d_scale = sum_ij G_ij dot_ij = <a, G b> (or <b, G^T a>), from those GEMMs' float32 results: as
    accurate as summing G * dot (measured at 2048 x 2048, scale 100: both ~1e-8 relative), without that
    pass. bfloat16 features: s G rounded to bfloat16 (as the GPU paths' G chunk) and bfloat16 GEMMs with
    float32 accumulation, several times faster than float32 ones on CPUs with bf16 instructions;
    d_scale then sums G * dot in float32 before the rounding.
    """
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    a_c, b_c = a.to(ct), b.to(ct)
    kept = saved_dots(stats, m)
    stats = stats.to(ct)
    bf16_gemms = a.dtype == torch.bfloat16
    # Gb lands in gb; without d_a it is still wanted for d_scale unless G^T a is computed anyway.
    gb_rows = n if (need_a or not need_b) else 0
    gb = torch.empty(gb_rows, a.shape[1], dtype=a.dtype if bf16_gemms else ct, device=a.device)
    db = torch.zeros(m if need_b else 0, b.shape[1], dtype=ct, device=a.device)
    dscale = torch.zeros((), dtype=ct, device=a.device)
    dbias = torch.zeros((), dtype=ct, device=a.device)
    step = n if kept is not None else _chunk_rows(m)
    rows = min(step, n)
    dot_buf = torch.empty(rows, m, dtype=ct, device=a.device) if kept is None else None
    g_buf = torch.empty(rows, m, dtype=ct, device=a.device)
    s_num = float(s)
    if kind == "softmax":
        w = grad.to(ct) * (0.5 if symmetric else 1.0)
        # z - bias at the positive, plus the loss: the row's (column's) full log-sum-exp of s dot.
        pos = stats[0] - bias.to(ct) if bias is not None else stats[0]
        neg_row_shift = -(pos + stats[1])
        diag_g = torch.expm1(-stats[1]) * w  # softmax - 1 at the positive, without the cancellation
        rank2 = False
        if symmetric:
            col_shift = pos + stats[2]
            diag_g += torch.expm1(-stats[2]) * w
            top = (-neg_row_shift).max()
            row_v = torch.exp(-neg_row_shift - top)  # exp(row_i - top) <= 1
            col_k = w * torch.exp(top - col_shift)  # w_j exp(top - col_j)
            rank2 = bool((top - col_shift).max() <= MAX_COLUMN_GAP) and bool(torch.isfinite(col_k).all())
        extra = torch.empty(rows, m, dtype=ct, device=a.device) if symmetric else None
    else:
        w = grad.to(ct)
        bias_c = bias.to(ct) if bias is not None else None
    for r0 in range(0, n, step):
        c = min(step, n - r0)
        ar = a_c[r0:r0 + c]
        if kept is not None:
            dot = kept
        else:
            with bf16_valued_fp32_gemms(bf16_gemms):
                dot = torch.mm(ar, b_c.T, out=dot_buf[:c])
        g = g_buf[:c]
        if kind == "softmax":
            # g = exp(s dot - row_i): the row softmax (probabilities, each <= 1)
            torch.add(neg_row_shift[r0:r0 + c, None], dot, alpha=s_num, out=g).exp_()
            if rank2:  # G = P w_i + Q w_j = P * (w_i + exp(row_i - top) w_j exp(top - col_j))
                g.mul_(torch.addr(w[r0:r0 + c, None], row_v[r0:r0 + c], col_k, out=extra[:c]))
            elif symmetric:
                q = torch.add(-col_shift[None, :], dot, alpha=s_num, out=extra[:c]).exp_().mul_(w[None, :])
                g.mul_(w[r0:r0 + c, None]).add_(q)
            else:
                g.mul_(w[r0:r0 + c, None])
            _positives(g, r0, offset).copy_(diag_g[r0:r0 + c])
        else:
            if bias_c is not None:
                torch.add(bias_c, dot, alpha=s_num, out=g)
            else:
                torch.mul(dot, s_num, out=g)
            if offset >= 0:
                _positives(g, r0, offset).neg_()
            # d softplus(u)/du = sigmoid(u), and u = -z at the positive
            g.sigmoid_().mul_(w[r0:r0 + c, None])
            if offset >= 0:
                _positives(g, r0, offset).neg_()
            dbias += g.sum()
        if bf16_gemms:
            dscale += (dot * g).sum()  # torch.sum's cascade summation: dot's fp32 sum lost ~1e-5 here
            # s G rounded to bfloat16 (as the GPU paths' G chunk), GEMMs with float32 accumulation.
            g_lp = g.mul_(s).to(torch.bfloat16)
            if gb_rows:
                torch.mm(g_lp, b, out=gb[r0:r0 + c])
            if need_b:
                db.add_(torch.mm(g_lp.T, a[r0:r0 + c]))
            continue
        if gb_rows:
            torch.mm(g, b_c, out=gb[r0:r0 + c])
        if need_b:
            db.addmm_(g.T, ar)
    if not bf16_gemms:
        dscale = (a_c * gb).sum() if gb_rows else (b_c * db).sum()
        gb.mul_(s)
        db.mul_(s)
    da = gb if need_a else gb[:0]
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias
