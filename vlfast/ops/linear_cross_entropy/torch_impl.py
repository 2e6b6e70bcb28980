"""Linear + cross-entropy from PyTorch's own kernels: the "torch" implementation (impl="auto" on a CPU).

The math is reference.py's. Rows go in chunks whose logits (float32, float64 for float64 inputs) fit in
CHUNK_BYTES, so memory stays bounded for any N; each chunk is one GEMM, torch's log_softmax written over
the logits, then the gradient G = dloss/dlogits (log_softmax's backward) written over them too, and two
GEMMs for d_hidden and d_weight. The chunk buffers (logits, a zero matrix for log_softmax's backward,
and bf16's copies) are scratch kept between calls; no step allocates more.

Precision: bfloat16 inputs use bfloat16 GEMMs (AMX / AVX512-BF16 kernels through oneDNN are several
times faster than float32 ones on CPUs that have them; they accumulate in float32). The logits come out
rounded to bfloat16, as in F.linear(...).float(); everything after is float32. G is rounded to bfloat16
for the gradient GEMMs only without its target column: those entries, -(1 - eps) * w_i + ..., are the
largest and cancel against p_it, so they are applied exactly in float32 (a gather of W's target rows and
an index_add into d_weight). float16 inputs are computed in float32 (a float16 G would underflow).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _workspace
from ..._gemm import add_linear_f32_, linear_f32, mm as _mm
from .reference import compute_dtype, reduce, row_weights

# Bytes of one chunk's logits at most; tests shrink it to force many chunks.
CHUNK_BYTES = 64 << 20
# Rows are taken CACHE_CHUNK_BYTES of logits at a time, or MIN_CHUNK_ROWS when that is fewer rows: a
# chunk that stays in cache between the GEMM and log_softmax ran 256 x 256 x V32000 in 16.3 ms against
# 18.3 as one 32 MiB chunk, while chunks of fewer rows re-read the weight too often (8 MiB: 54 against
# 47 ms with its gradients).
CACHE_CHUNK_BYTES = 16 << 20
MIN_CHUNK_ROWS = 128


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the GEMMs run in for inputs of `dtype`."""
    return torch.bfloat16 if dtype == torch.bfloat16 else compute_dtype(dtype)


def chunk_rows(v: int, ct: torch.dtype) -> int:
    row = max(1, v * torch.finfo(ct).bits // 8)
    return max(1, min(CHUNK_BYTES // row, max(CACHE_CHUNK_BYTES // row, MIN_CHUNK_ROWS)))


class _Chunk:
    """The per-call constants and reusable buffers of the chunk loop (logits of at most `rows` rows)."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, ignore_index: int,
                 label_smoothing: float, softcap: float, z_loss: float):
        n, v = hidden.shape[0], weight.shape[0]
        self.ct, self.gt = compute_dtype(hidden.dtype), gemm_dtype(hidden.dtype)
        self.hidden, self.weight = hidden.to(self.gt), weight.to(self.gt)
        self.bias = None if bias is None else bias.to(self.gt)
        self.kept = targets != ignore_index
        self.safe_targets = torch.where(self.kept, targets, 0)  # ignored rows read column 0, weighted 0
        self.eps, self.softcap, self.z_loss = label_smoothing, softcap, z_loss
        self.rows = max(1, min(n, chunk_rows(v, self.ct)))
        self.weight_grad = None  # bf16 in one chunk: the finished d_weight (accumulate)
        # scratch kept per thread between calls (vlfast._workspace): fresh chunks were faulted in page by page
        self.logits = _workspace.matrix("linear_cross_entropy.logits", self.rows, v, self.ct, hidden.device)
        # bf16: the GEMM's logits, later the bf16 copy of G
        self.narrow = None if self.gt == self.ct else \
            _workspace.matrix("linear_cross_entropy.narrow", self.rows, v, self.gt, hidden.device)
        self.tanh = _workspace.matrix("linear_cross_entropy.tanh", self.rows, v, self.ct, hidden.device) \
            if softcap else None

    def logits_of(self, r0: int, r1: int) -> Tensor:
        """z (C, V) for rows r0:r1, softcapped, in the chunk's logits buffer (tanh(raw / c) kept for G)."""
        c = r1 - r0
        z = self.logits[:c]
        h = self.hidden[r0:r1]
        # the bias inside the GEMM, before a bf16 output's rounding (a logit near 0 stays exact)
        out = z if self.narrow is None else self.narrow[:c]
        if self.gt == torch.float32:  # oneDNN where it beats the BLAS: a fresh z (vlfast._gemm.linear_f32)
            z = linear_f32(h, self.weight, self.bias, out=out)
        elif self.bias is None:
            torch.mm(h, self.weight.T, out=out)
        else:
            torch.addmm(self.bias, h, self.weight.T, out=out)
        if self.narrow is not None:
            z.copy_(out)
        if self.softcap:
            t = self.tanh[:c]
            torch.div(z, self.softcap, out=t).tanh_()
            torch.mul(t, self.softcap, out=z)
        return z

    def losses(self, z: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """(lse (C,), loss (C,)) of capped logits z; turns z into log-probabilities in place."""
        tc = self.safe_targets[r0:r1, None]
        z_t = z.gather(1, tc)[:, 0]
        torch._log_softmax(z, 1, False, out=z)
        logp_t = z.gather(1, tc)[:, 0]
        lse = z_t - logp_t
        loss = -logp_t if not self.eps else (self.eps - 1) * logp_t - self.eps * z.mean(dim=1)
        if self.z_loss:
            loss = loss + self.z_loss * lse ** 2
        return lse, torch.where(self.kept[r0:r1], loss, 0)

    def gradient(self, logp: Tensor, lse: Tensor, w: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """(G, g_t): G (C, V) = w_i * dloss_i / draw_ij written over the log-probabilities logp (C, V),
        without the target column (set to 0); g_t (C,) that column's entries, exact in the compute dtype."""
        c, v = logp.shape
        tc = self.safe_targets[r0:r1, None]
        logp_t = logp.gather(1, tc)[:, 0]
        # off the target: w * (p + 2 z_loss lse p - eps / V). scale * p is log_softmax's backward for an
        # upstream gradient of -scale at the target and 0 elsewhere, written over logp: one pass with
        # log_softmax's own exp (1024 x 4096: 0.71 ms, against 1.4 for exp_ and mul_). The upstream
        # gradient is a kept zero matrix whose target entries are set and cleared again.
        scale = w * (1 + (2 * self.z_loss) * lse) if self.z_loss else w
        upstream = _workspace.zeros("linear_cross_entropy.upstream", c, v, logp.dtype, logp.device)
        try:
            upstream.scatter_(1, tc, -scale[:, None])
            # elementwise per row after the row's sum of upstream: out may be logp itself
            g = torch.ops.aten._log_softmax_backward_data.out(upstream, logp, 1, logp.dtype, out=logp)
        finally:
            upstream.scatter_(1, tc, 0.0)
        if self.eps:
            g.sub_((w * (self.eps / v))[:, None])
        # on the target, term by term as reference.py (p_t - 1 as expm1: no cancellation)
        p_t = logp_t.exp()
        g_t = (1 - self.eps) * torch.expm1(logp_t) + self.eps * (p_t - 1 / v)
        if self.z_loss:
            g_t = g_t + (2 * self.z_loss) * lse * p_t
        g_t = g_t * w
        if self.softcap:  # chain factor d(c tanh(raw / c)) / draw = 1 - tanh^2
            t = self.tanh[:g.shape[0]]
            g_t = g_t * (1 - t.gather(1, tc)[:, 0] ** 2)
            g.mul_(t.square_().neg_().add_(1))
        g.scatter_(1, tc, 0)
        return g, g_t

    def accumulate(self, g: Tensor, g_t: Tensor, r0: int, r1: int, dh: Tensor, dw: Optional[Tensor],
                   db: Optional[Tensor], first: bool) -> Optional[Tensor]:
        """dh[r0:r1] = G @ W, dw += G.T @ h, db += G.sum(0), with G's target column added exactly;
        returns dw (the first chunk's float32 product may be a fresh tensor, not the dw passed in)."""
        t = self.safe_targets[r0:r1]
        h = self.hidden[r0:r1]
        gg = g if self.narrow is None else self.narrow[:g.shape[0]].copy_(g)
        if dh.shape[0]:
            dh[r0:r1] = torch.addcmul(_mm(gg, self.weight).to(self.ct), g_t[:, None],
                                      self.weight.index_select(0, t).to(self.ct))
        if dw is not None and self.narrow is not None and first and r1 == self.hidden.shape[0]:
            self.weight_grad = self._bf16_weight_grad(gg, g_t, t, h)
        elif dw is not None:
            if self.narrow is not None:  # the bf16 GEMM's partial sums accumulate in float32
                dw.copy_(torch.mm(gg.T, h)) if first else dw.add_(torch.mm(gg.T, h))
            elif first:
                dw = _mm(gg.T, h, out=dw)
            else:
                dw = add_linear_f32_(dw, gg.T, h.T) if self.gt == torch.float32 else dw.addmm_(gg.T, h)
            dw.index_add_(0, t, g_t[:, None] * h.to(self.ct))
        if db is not None:
            db.add_(g.sum(dim=0)).index_add_(0, t, g_t)
        return dw


    def _bf16_weight_grad(self, gg: Tensor, g_t: Tensor, t: Tensor, h: Tensor) -> Tensor:
        """d_weight (V, H) bf16 of a single chunk: the bf16 GEMM's result, where only the target rows
        take the exact target-column terms, added in float32 and rounded once: the bits of the float32
        accumulator path (same sums, same order) without its two passes over V x H."""
        part = torch.mm(gg.T, h)
        rows, slot = torch.unique(t, return_inverse=True)
        fixed = part.index_select(0, rows).to(self.ct).index_add_(0, slot, g_t[:, None] * h.to(self.ct))
        return part.index_copy_(0, rows, fixed.to(part.dtype))


def _buffers(chunk: _Chunk, n: int, h: int, v: int, hidden: Tensor, need: tuple[bool, bool, bool]):
    """dh (N, H) in the input dtype (or (0, H)); dw (V, H) and db (V,) accumulators in the compute
    dtype, or None. The first chunk writes dw; with no rows there is none, so it starts at 0."""
    dev = hidden.device
    dh = torch.empty(n if need[0] else 0, h, dtype=hidden.dtype, device=dev)
    dw = None
    if need[1] and chunk.ct != hidden.dtype:  # a float32 sum that _finish rounds: scratch
        dw = _workspace.matrix("linear_cross_entropy.dw", v, h, chunk.ct, dev)
    elif need[1]:
        dw = torch.empty(v, h, dtype=chunk.ct, device=dev)
    if dw is not None and not n:
        dw.zero_()
    db = torch.zeros(v, dtype=chunk.ct, device=dev) if need[2] else None
    return dh, dw, db


def _finish(dw: Optional[Tensor], db: Optional[Tensor], weight: Tensor) -> tuple[Tensor, Tensor]:
    """The accumulators in the weight's dtype; empty where not needed."""
    return (weight.new_empty(0, weight.shape[1]) if dw is None else dw.to(weight.dtype),
            weight.new_empty(0) if db is None else db.to(weight.dtype))


def forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], ignore_index: int,
            label_smoothing: float, softcap: float, z_loss: float, reduction: str, need: tuple[bool, bool, bool]):
    """(loss, lse (N,), d_hidden, d_weight, d_bias), as reference.forward_chunked: for mean / sum with
    `need` flags set, the gradients of the reduced loss come out of the same pass (empty otherwise)."""
    n, h = hidden.shape
    v = weight.shape[0]
    chunk = _Chunk(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, z_loss)
    eager = reduction != "none" and any(need)
    w_rows = row_weights(targets, ignore_index, reduction, chunk.ct) if eager else None
    lse = torch.empty(n, dtype=chunk.ct, device=hidden.device)
    rows = torch.empty(n, dtype=chunk.ct, device=hidden.device)
    dh, dw, db = _buffers(chunk, n, h, v, hidden, need if eager else (False, False, False))
    for r0 in range(0, n, chunk.rows):
        r1 = min(n, r0 + chunk.rows)
        z = chunk.logits_of(r0, r1)
        lse[r0:r1], rows[r0:r1] = chunk.losses(z, r0, r1)
        if eager:
            g, g_t = chunk.gradient(z, lse[r0:r1], w_rows[r0:r1], r0, r1)
            dw = chunk.accumulate(g, g_t, r0, r1, dh, dw, db, first=r0 == 0)
    loss = reduce(rows, targets, ignore_index, reduction)
    return (loss, lse, dh) + _finish(dw if chunk.weight_grad is None else chunk.weight_grad, db, weight)


def backward(grad_rows: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
             lse: Tensor, ignore_index: int, label_smoothing: float, softcap: float, z_loss: float,
             need: tuple[bool, bool, bool]):
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows_i * loss_i (reduction "none"), recomputing logits."""
    n, h = hidden.shape
    v = weight.shape[0]
    chunk = _Chunk(hidden, weight, bias, targets, ignore_index, label_smoothing, softcap, z_loss)
    w_rows = grad_rows.to(chunk.ct) * chunk.kept.to(chunk.ct)
    lse = lse.to(chunk.ct)
    dh, dw, db = _buffers(chunk, n, h, v, hidden, need)
    for r0 in range(0, n, chunk.rows):
        r1 = min(n, r0 + chunk.rows)
        z = chunk.logits_of(r0, r1)
        logp = z.sub_(lse[r0:r1, None])
        g, g_t = chunk.gradient(logp, lse[r0:r1], w_rows[r0:r1], r0, r1)
        dw = chunk.accumulate(g, g_t, r0, r1, dh, dw, db, first=r0 == 0)
    return (dh,) + _finish(dw if chunk.weight_grad is None else chunk.weight_grad, db, weight)
