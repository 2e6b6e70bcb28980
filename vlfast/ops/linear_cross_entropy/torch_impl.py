"""Linear + cross-entropy from PyTorch's own kernels: the "torch" implementation (impl="auto" on a CPU).

The math is reference.py's. Rows go in chunks whose logits (float32, float64 for float64 inputs) fit in
CHUNK_BYTES, so memory stays bounded for any N; each chunk is one GEMM, then, a block of rows at a time
(SUB_BYTES of scores, in cache), torch's softmax written over the logits (the loss takes log p_t of the
target column) and the gradient G = dloss/dlogits, the probabilities scaled per row in place; then two
GEMMs for d_hidden and d_weight. The chunk buffers (the GEMM's logits, bf16's float32 block) are scratch
kept between calls; no step allocates more.

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
# chunk that stays in cache between the GEMM and its log_softmax (before G came from the softmax) ran
# 256 x 256 x V32000 in 16.3 ms against 18.3 as one 32 MiB chunk, while chunks of fewer rows re-read the
# weight too often (8 MiB: 54 against 47 ms with its gradients).
CACHE_CHUNK_BYTES = 16 << 20
MIN_CHUNK_ROWS = 128
# A chunk's softmax and gradient go SUB_BYTES of scores at a time (at least MIN_SUB_ROWS rows): the
# passes over a block then stay in cache (1024 x 512 x V4096 bf16: 256-row blocks took 0.55 ms less than
# the whole 16 MiB chunk).
SUB_BYTES = 4 << 20
MIN_SUB_ROWS = 32
# A target probability below this (log p_t < -69) takes lse from the row's logits, not log p_t: float32
# keeps full precision down to 1.2e-38, and 1e-30 leaves the softmax's own rounding room.
TINY_P = 1e-30


def gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the GEMMs run in for inputs of `dtype`."""
    return torch.bfloat16 if dtype == torch.bfloat16 else compute_dtype(dtype)


def chunk_rows(v: int, ct: torch.dtype) -> int:
    row = max(1, v * torch.finfo(ct).bits // 8)
    return max(1, min(CHUNK_BYTES // row, max(CACHE_CHUNK_BYTES // row, MIN_CHUNK_ROWS)))


def sub_rows(v: int, ct: torch.dtype, rows: int) -> int:
    """Rows of a chunk whose softmax and gradient run as one block."""
    row = max(1, v * torch.finfo(ct).bits // 8)
    return max(1, min(rows, max(SUB_BYTES // row, MIN_SUB_ROWS)))


class _Chunk:
    """The per-call constants and reusable buffers of the chunk loop (logits of at most `rows` rows,
    their softmax and gradient in blocks of `sub` rows)."""

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
        self.sub = sub_rows(v, self.ct, self.rows)
        self.weight_grad = None  # bf16 in one chunk: the finished d_weight (accumulate)
        # scratch kept per thread between calls (vlfast._workspace): fresh chunks were faulted in page by page.
        # The GEMM's logits (later G) go to `narrow` for bf16 (a block's float32 copy to `logits`), else to
        # `logits`, in place.
        dev = hidden.device
        self.narrow = None if self.gt == self.ct else \
            _workspace.matrix("linear_cross_entropy.narrow", self.rows, v, self.gt, dev)
        self.logits = _workspace.matrix("linear_cross_entropy.logits", self.rows if self.narrow is None else self.sub,
                                        v, self.ct, dev)
        self.tanh = _workspace.matrix("linear_cross_entropy.tanh", self.sub, v, self.ct, dev) if softcap else None

    def _gemm(self, h: Tensor, out: Tensor) -> Tensor:
        """h @ W.T + b (rows of h, V) in the GEMM dtype, in `out` or (oneDNN's float32) a fresh tensor."""
        # the bias inside the GEMM, before a bf16 output's rounding (a logit near 0 stays exact)
        if self.gt == torch.float32:  # oneDNN where it beats the BLAS (vlfast._gemm.linear_f32)
            return linear_f32(h, self.weight, self.bias, out=out)
        if self.bias is None:
            return torch.mm(h, self.weight.T, out=out)
        return torch.addmm(self.bias, h, self.weight.T, out=out)

    def _cap(self, z: Tensor, t: Tensor) -> Tensor:
        """z <- c * tanh(z / c) in place, tanh(z / c) kept in t (G's chain factor)."""
        torch.div(z, self.softcap, out=t).tanh_()
        return torch.mul(t, self.softcap, out=z)

    def run(self, r0: int, r1: int, lse: Tensor, loss: Optional[Tensor], w: Optional[Tensor],
            db: Optional[Tensor]) -> Optional[tuple[Tensor, Tensor]]:
        """Rows r0:r1: their GEMM, then block by block the softmax, the loss and the gradient. The forward
        (loss given) writes lse[r0:r1] and loss[r0:r1]; the backward's recompute (loss None) reads lse. With
        row weights w (N,): adds G's column sums to db and returns (G, g_t): G (C, V) in the GEMM dtype over
        the chunk's logits, its target column 0, and g_t (C,) that column's entries, exact in the compute
        dtype."""
        raw = self._gemm(self.hidden[r0:r1], self.logits[:r1 - r0] if self.narrow is None else self.narrow[:r1 - r0])
        g_t = None if w is None else torch.empty(r1 - r0, dtype=self.ct, device=raw.device)
        for a in range(0, r1 - r0, self.sub):
            b = min(r1 - r0, a + self.sub)
            s0, s1 = r0 + a, r0 + b
            z = raw[a:b] if self.narrow is None else self.logits[:b - a].copy_(raw[a:b])
            if self.softcap:
                self._cap(z, self.tanh[:b - a])
            z_t, p_t, z_mean = self.softmax(z, s0, s1, want_mean=loss is not None and bool(self.eps))
            if loss is not None:
                lse[s0:s1], loss[s0:s1], logp_t = self.losses(z_t, p_t, z_mean, s0, s1)
            else:  # p normalised again; log p_t from the forward's lse
                logp_t = z_t - lse[s0:s1]
            if w is not None:
                g, g_t[a:b] = self.gradient(z, lse[s0:s1], logp_t, w[s0:s1], s0, s1)
                if db is not None:
                    db.add_(g.sum(dim=0))
                if self.narrow is not None:
                    raw[a:b].copy_(g)
        return None if w is None else (raw, g_t)

    def softmax(self, z: Tensor, r0: int, r1: int, want_mean: bool) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """(z_t, p_t, mean_j z or None), each (C,): the target column's logit and probability, and the row
        mean of z when want_mean; turns z (C, V) into its softmax in place."""
        tc = self.safe_targets[r0:r1, None]
        z_t = z.gather(1, tc)[:, 0]
        z_mean = z.mean(dim=1) if want_mean else None
        torch._softmax(z, 1, False, out=z)
        return z_t, z.gather(1, tc)[:, 0], z_mean

    def losses(self, z_t: Tensor, p_t: Tensor, z_mean: Optional[Tensor], r0: int, r1: int
               ) -> tuple[Tensor, Tensor, Tensor]:
        """(lse, loss, log p_t), each (C,), of rows r0:r1 from softmax's results."""
        logp_t = p_t.log()
        # p_t below float32's normal range (a target the row rules out by ~70 nats or more) has lost its
        # digits: those rows' lse is the logsumexp of their logits, computed again
        low = p_t < TINY_P
        if bool(low.any()):
            idx = low.nonzero()[:, 0]
            logp_t = logp_t.index_put((idx,), z_t[idx] - self._logsumexp(r0 + idx))
        lse = z_t - logp_t
        loss = -logp_t if not self.eps else (self.eps - 1) * logp_t - self.eps * (z_mean - lse)
        if self.z_loss:
            loss = loss + self.z_loss * lse ** 2
        return lse, torch.where(self.kept[r0:r1], loss, 0), logp_t

    def _logsumexp(self, rows: Tensor) -> Tensor:
        """logsumexp of the capped logits of `rows` (global row indices), from their own GEMM (its bf16
        rounding may differ from the chunk's GEMM's in the last bit)."""
        h = self.hidden.index_select(0, rows)
        z = self._gemm(h, torch.empty(h.shape[0], self.weight.shape[0], dtype=self.gt, device=h.device)).to(self.ct)
        if self.softcap:
            self._cap(z, torch.empty_like(z))
        return torch.logsumexp(z, dim=1)

    def gradient(self, p: Tensor, lse: Tensor, logp_t: Tensor, w: Tensor, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """(G, g_t) of rows r0:r1: G (C, V) = w_i * dloss_i / draw_ij written over their probabilities p (C, V),
        without the target column (set to 0); g_t (C,) that column's entries, exact in the compute dtype."""
        c, v = p.shape
        tc = self.safe_targets[r0:r1, None]
        # off the target: w * (p + 2 z_loss lse p - eps / V), the row's factor applied in place (1024 x
        # 4096: softmax and this pass 1.0 ms, where log_softmax and its backward took 1.6)
        g = p.mul_((w * (1 + (2 * self.z_loss) * lse) if self.z_loss else w)[:, None])
        if self.eps:
            g.sub_((w * (self.eps / v))[:, None])
        # on the target, term by term as reference.py (p_t - 1 as expm1: no cancellation)
        p_t = logp_t.exp()
        g_t = (1 - self.eps) * torch.expm1(logp_t) + self.eps * (p_t - 1 / v)
        if self.z_loss:
            g_t = g_t + (2 * self.z_loss) * lse * p_t
        g_t = g_t * w
        if self.softcap:  # chain factor d(c tanh(raw / c)) / draw = 1 - tanh^2
            t = self.tanh[:c]
            g_t = g_t * (1 - t.gather(1, tc)[:, 0] ** 2)
            g.mul_(t.square_().neg_().add_(1))
        g.scatter_(1, tc, 0)
        return g, g_t

    def accumulate(self, gg: Tensor, g_t: Tensor, r0: int, r1: int, dh: Tensor, dw: Optional[Tensor],
                   db: Optional[Tensor], first: bool) -> Optional[Tensor]:
        """dh[r0:r1] = G @ W, dw += G.T @ h, db's target entries, for G (C, V) in the GEMM dtype without
        its target column, which g_t (C,) adds exactly; returns dw (the first chunk's float32 product may
        be a fresh tensor, not the dw passed in)."""
        t = self.safe_targets[r0:r1]
        h = self.hidden[r0:r1]
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
            db.index_add_(0, t, g_t)
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
        grads = chunk.run(r0, r1, lse, rows, w_rows, db)
        if eager:
            dw = chunk.accumulate(*grads, r0, r1, dh, dw, db, first=r0 == 0)
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
        dw = chunk.accumulate(*chunk.run(r0, r1, lse, None, w_rows, db), r0, r1, dh, dw, db, first=r0 == 0)
    return (dh,) + _finish(dw if chunk.weight_grad is None else chunk.weight_grad, db, weight)
