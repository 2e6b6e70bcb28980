"""The contrastive loss as a composition of PyTorch's own kernels: impl="torch", the CPU fast path.

Same math as reference.py (margin form: row_i = softplus(logsumexp over negatives of z_ij - z_ii)),
organised for speed: per chunk of rows one GEMM in the compute dtype (float32, float64 for float64;
bf16/fp16 features are upcast once; bf16-valued float32 GEMMs run in oneDNN's bf16 mode, exact
products accumulated in float32, see bf16_valued_fp32_gemms), then in-place elementwise passes on
that one buffer: E = exp(t - h_i) with h_i the row's largest negative logit gives the row sums, and
(symmetric) the column sums as one matrix-vector product, sum_i E_ij exp(h_i - top).

When one chunk holds every row the forward keeps that chunk behind its stats, in the same storage
(autograd saves stats for the backward): E and h for softmax, whose gradient is
E * (alpha_i + v_i k_j), the products a @ b^T for sigmoid. The backward then skips the logits GEMM.
That storage comes back to the next call once its graph is freed (_workspace.storage): a training
step does not fault a fresh 16 MiB in.
Extra memory: at most three chunk buffers of CHUNK_ELEMENTS each plus O((N + M) D); never N x M
unless that fits one chunk. The scratch chunks (the forward's logits when not kept, the backward's G,
products and bf16's rounded G) stay allocated per thread between calls (_chunk_buffer): at most
one chunk each.

Shapes: a (N, D), b (M, D), scale / bias 0-d, stats (3, N) as in reference.py.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import _workspace
from ..._gemm import add_linear_f32_, mm as _mm
from .reference import compute_dtype

# Elements of one chunk buffer (16 MiB at float32); tests shrink it to force several chunks.
CHUNK_ELEMENTS = 1 << 22

# bfloat16 features: from this many logits on, d_a comes from a bf16-output GEMM of the bf16-rounded s G
# (half the time of a float32-output one: 2048 x 2048 x 512, 1.5 against 3.0 ms), and d_scale = <a, d_a> / s
# sees both roundings, sums of N x M and N x D independent errors that average out at such sizes
# (2048 x 512: 1.16e-4 relative, as with a float32 d_a). Over a few rows they do not (1 x 12: 7x bf16
# PyTorch's error): below it, d_a is the float32 GEMM of the float32 G.
BF16_OUT_MIN_LOGITS = 1 << 20

# Column sums come from row-shifted exponentials: exp(t_ij - top) = exp(t_ij - h_i) * exp(h_i - top).
# When every column's log-sum-exp is within this many nats of top, a factor that underflows stands
# for a term below e^-47 of the column's, nothing next to the ones kept. Past it (a text far from
# every image) the column is exponentiated on its own.
MAX_COLUMN_GAP = 40.0
LOG2E = 1.0 / math.log(2.0)


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


def _exp_(x: Tensor) -> Tensor:
    """exp(x) in place, as exp2(x log2 e). PyTorch's float exp runs MKL's vector math (ATen's vml.h), slow
    on an AMD CPU (2048 x 2048 on a Zen 5 pair: 1.3 ms, against 0.34 for exp2, ATen's own vectorised
    kernel, and 0.2 for the multiply); the multiply rounds once more: row and column sums of exp(s dot - h) within ~5e-8
    relative of float64, against ~3e-8 for exp. x must be the shifted logit itself (computed in one
    rounding): folding log2 e into s and h beforehand rounds each alone and misses by ~|s dot| 2^-24."""
    return x.mul_(LOG2E).exp2_()


def _copy_into(whole: Tensor, rows: slice, part: Tensor) -> Tensor:
    """whole with its rows `rows` = part (a product _mm wrote there, or a fresh one): part itself where it
    covers every row, without a copy."""
    if part.data_ptr() == whole[rows].data_ptr():
        return whole
    if part.shape[0] == whole.shape[0]:
        return part
    whole[rows].copy_(part)
    return whole


def _softplus(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """log(1 + exp(x)), tiny values kept (log1p); past 40 it is x to within e^-40 relative (into out)."""
    if out is None:
        return F.softplus(x, threshold=40.0)
    return torch._C._nn.softplus(x, 1.0, 40.0, out=out)


def _chunk_buffer(name: str, rows: int, m: int, dtype: torch.dtype, device) -> Tensor:
    """A (rows, M) scratch buffer, kept per thread between calls (one chunk at most, CHUNK_ELEMENTS,
    each; see vlfast._workspace). "logits": the forward's chunk when not kept; the backward's "g": G,
    "dot": recomputed products; "g_lp" (bf16 only): s G rounded for the d_b GEMM."""
    return _workspace.matrix(f"clip_loss.{name}", rows, m, dtype, device)


def _chunk_rows(m: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(m, 1))


def _positives(t: Tensor, r0: int, offset: int) -> Tensor:
    """View (C,) of chunk t's entries (i, i + offset) for its rows r0 .. r0 + C - 1."""
    return t.diagonal(offset=r0 + offset)[: t.shape[0]]


def _kept_planes(kind: str, dtype: torch.dtype) -> tuple[bool, bool]:
    """What a kept chunk holds: (the products a @ b^T, E = exp(t - h)). Softmax: E (d_scale comes
    from the gradient GEMMs); sigmoid: the products."""
    if kind != "softmax":
        return True, False
    return False, True


def _kept_size(n: int, m: int, planes: tuple[bool, bool]) -> int:
    return 4 * n + sum(planes) * n * m


def _kept_views(stats: Tensor, m: int, planes: tuple[bool, bool]):
    """h (N,), products (N, M) or None, E (N, M) or None: the storage after stats, in that order."""
    n = stats.shape[1]
    views, start = [], 4 * n
    for present in planes:
        views.append(stats.as_strided((n, m), (m, 1), start) if present else None)
        start += n * m if present else 0
    return (stats.as_strided((n,), (1,), 3 * n), *views)


def _stats_and_kept(n: int, m: int, ct: torch.dtype, device, planes: tuple[bool, bool], keep: bool):
    """stats (3, N) zeros and, if keep, the kept views (_kept_views) right after them in one storage
    (else None, None, None).

    stats is a plain (non-view) tensor on that storage: autograd saves it for the backward, which
    finds the kept chunk there (kept_chunk), so it lives exactly as long as the graph does.
    """
    if not keep:
        return torch.zeros(3, n, dtype=ct, device=device), (None, None, None)
    itemsize = torch.empty((), dtype=ct).element_size()
    storage = _workspace.storage(f"clip_loss.kept.{ct}", _kept_size(n, m, planes) * itemsize, device)
    stats = torch.empty(0, dtype=ct, device=device).set_(storage, 0, (3, n), (n, 1)).zero_()
    return stats, _kept_views(stats, m, planes)


def kept_chunk(stats: Tensor, m: int, planes: tuple[bool, bool]):
    """The forward's (h, products, E) (see _kept_views), or None (several chunks, or stats copied)."""
    whole = _kept_size(stats.shape[1], m, planes) * stats.element_size()
    if stats.storage_offset() != 0 or not stats.is_contiguous() or stats.untyped_storage().nbytes() != whole:
        return None
    return _kept_views(stats, m, planes)


def _dot_sum(a: Tensor, b: Tensor) -> Tensor:
    """0-d sum_ik a_ik b_ik of two (R, D) matrices: per row a torch.sum (cascade summation) of the
    products, formed in row chunks in a scratch buffer (a fresh (R, D) temporary was faulted in on
    every call), then the rows' sum."""
    r, d = a.shape
    rows = torch.empty(r, dtype=a.dtype, device=a.device)
    step = max(1, CHUNK_ELEMENTS // max(d, 1))
    buf = _workspace.matrix("clip_loss.products", min(step, r), d, a.dtype, a.device)
    for r0 in range(0, r, step):
        c = min(step, r - r0)
        torch.sum(torch.mul(a[r0:r0 + c], b[r0:r0 + c], out=buf[:c]), dim=1, out=rows[r0:r0 + c])
    return rows.sum()


def _features(x: Tensor, ct: torch.dtype, name: str) -> Tensor:
    """x in the compute dtype: x itself, or a copy in the scratch buffer clip_loss.<name> when it holds
    at most CHUNK_ELEMENTS (a fresh copy past that). Only the calling forward / backward may use it."""
    if x.dtype == ct:
        return x
    if x.numel() > CHUNK_ELEMENTS:
        return x.to(ct)
    return _workspace.matrix(f"clip_loss.{name}", x.shape[0], x.shape[1], ct, x.device).copy_(x)


def _column_logsumexp(e: Tensor, h: Tensor, logits_again: Callable[[], Tensor]) -> Tensor:
    """log sum_i exp(t_ij) (M,) over a chunk's rows from e = exp(t - h_i) (C, M) and h (C,).

    One matrix-vector product; if a column falls more than MAX_COLUMN_GAP below the top row shift
    it could have lost terms to underflow, and the chunk's logits (logits_again()) are reduced as they are.
    """
    top = h.max()
    sums = torch.mv(e.T, torch.exp(h - top))
    if sums.min().item() >= math.exp(-MAX_COLUMN_GAP):  # False for NaN too
        return sums.log_().add_(top)
    return torch.logsumexp(logits_again(), dim=0)


def forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str, symmetric: bool,
            offset: int, backward_follows: bool = True) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and stats (3, N) in the compute dtype. backward_follows=False (no gradient
    wanted): the chunk is not kept behind the stats, so a one-chunk call takes the scratch buffer
    instead of a fresh one (faulted in page by page: ~0.1 ms of a 0.8 ms call at 512 x 512)."""
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    bf16_values = a.dtype == torch.bfloat16
    planes = _kept_planes(kind, a.dtype)
    a, b = _features(a, ct, "a"), _features(b, ct, "b")
    step = _chunk_rows(m)
    stats, (kept_h, kept_dot, kept_e) = _stats_and_kept(n, m, ct, a.device, planes,
                                                        keep=backward_follows and step >= n)
    # the logits' (or E's) buffer; the products go to kept_dot when kept, else here too
    buf = kept_e if kept_e is not None else _chunk_buffer("logits", min(step, n), m, ct, a.device)

    def products(r0: int, c: int, out: Optional[Tensor] = None) -> Tensor:
        """a[r0:r0 + c] @ b^T (C, M) into out, else the kept chunk (one chunk), else buf (or, float32 in
        oneDNN, a fresh tensor: copied over only to be kept)."""
        into = out if out is not None else (kept_dot if kept_dot is not None else buf)[:c]
        if bf16_values:
            with bf16_valued_fp32_gemms(True):
                return torch.mm(a[r0:r0 + c], b.T, out=into)
        dot = _mm(a[r0:r0 + c], b.T, out=into)
        return into.copy_(dot) if kept_dot is not None and out is None and dot is not into else dot

    if kind == "softmax":
        # The bias shifts every logit of a row and its positive alike: the margins do not see it.
        col_nlse = None  # (M,) log-sum-exp of each column's negatives so far
        # each row's positive, s times its product from the chunk's GEMM: rounded as its negatives are,
        # and one pass fewer than a separate dot product (~0.1 ms of a 0.7 ms forward at 512 x 256);
        # near-perfect pairs at scale 100, 2048 x 512: loss within 2.5e-6 relative (1.1e-6 that way).
        # (stats[0] gets the bias only after the last use)
        pos = stats[0]
        s_num = float(s)
        for r0 in range(0, n, step):
            c = min(step, n - r0)
            dot = products(r0, c)
            diag = _positives(dot, r0, offset)
            torch.mul(diag, s, out=pos[r0:r0 + c])
            diag.fill_(float("-inf"))
            h = dot.amax(dim=1).mul_(s)  # the largest negative logit (s >= 0)
            h.nan_to_num_(nan=0.0, neginf=0.0)  # a row without negatives (N = M = 1): -inf, or 0 * -inf
            e = _exp_(torch.add(-h[:, None], dot, alpha=s_num, out=buf[:c]))
            _positives(e, r0, offset).fill_(0.0)
            # logsumexp_j (t_ij - pos_i) = h_i + log sum_j e_ij - pos_i: h_i is a negative close to
            # pos_i in the near-perfect case, so the subtraction loses nothing there.
            _softplus(e.sum(dim=1).log_().add_(h).sub_(pos[r0:r0 + c]), out=stats[1, r0:r0 + c])
            if kept_h is not None:
                kept_h.copy_(h)
            if symmetric:
                def again(r0=r0, c=c):
                    t = products(r0, c, out=torch.empty(c, m, dtype=ct, device=a.device)).mul_(s)
                    _positives(t, r0, offset).fill_(float("-inf"))
                    return t
                part = _column_logsumexp(e, h, again)
                col_nlse = part if col_nlse is None else torch.logaddexp(col_nlse, part)
        if symmetric:
            col_nlse -= pos
        if bias is not None:
            stats[0] += bias.to(ct)
        if not symmetric:
            return stats[1].clone(), stats
        _softplus(col_nlse, out=stats[2])
        return (stats[1] + stats[2]) / 2, stats
    bias_c = bias.to(ct) if bias is not None else None
    s_num = float(s)
    for r0 in range(0, n, step):
        c = min(step, n - r0)
        if bias_c is None:
            t = torch.mul(products(r0, c), s, out=buf[:c])
        else:
            t = torch.add(bias_c, products(r0, c), alpha=s_num, out=buf[:c])
        if offset >= 0:  # softplus(-z) at the positive, softplus(z) elsewhere
            _positives(t, r0, offset).neg_()
        # softplus in place (F.softplus's threshold 20): a fresh chunk-sized result faulted its pages in
        stats[1, r0:r0 + c] = torch._C._nn.softplus(t, 1, 20, out=t).sum(dim=1)
    return stats[1].clone(), stats


def _outer_sum(alpha: Tensor, v: Tensor, k: Tensor, out: Tensor) -> Tensor:
    """out (C, M) = alpha_i + v_i k_j: the outer product, then alpha added in place (2048 x 2048 on a Zen 5
    pair, with the multiply by E that follows: 0.5 ms, against 1.2 with a broadcast addcmul of the three
    operands; a GEMM of inner size 2 took 1.5 alone)."""
    return torch.mul(v[:, None], k[None, :], out=out).add_(alpha[:, None])


def backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], stats: Tensor,
             kind: str, symmetric: bool, offset: int, need_a: bool = True,
             need_b: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_a, d_b, d_scale, d_bias) of sum_i grad_i * loss_i; d_a / d_b empty (0, D) when not needed.

    Per chunk: G = dLoss/dz (reference.logit_grad_chunk's formula), then Gb = G @ b and
    d_b += G^T @ a_c; d_a = s Gb, d_b = s (sum), and d_scale = sum_ij G_ij dot_ij = <a, G b>
    (or <b, G^T a>) from those GEMMs' float32 results: as accurate as summing G * dot (measured at
    2048 x 2048, scale 100: both ~1e-8 relative), without that pass. Softmax: with E = exp(s dot - h_i)
    (the kept one, or from this chunk's products with h = each row's log-sum-exp), the row softmax is
    E exp(h_i - row_i) and the column one E exp(h_i - top) exp(top - col_j), so
    G = E * (alpha_i + v_i k_j) off the positives. bfloat16 features: s G rounded to bfloat16 (as the
    GPU paths' G chunk) and GEMMs with exact bf16 products and float32 sums, several times faster than
    float32 ones on CPUs with bf16 instructions, into bfloat16 (the float32 sums rounded once): (s G) b
    (d_a; d_scale = <a, d_a> / s summed in float32) and (s G)^T a (d_b). d_a's rounding adds nothing
    measurable to d_scale's error, which rounding G to bf16 sets (2048 x 512: 1.16e-4 relative either
    way, and ~1e-4 to 3e-3 over scales 14 to 100, against 1e-3 to 4e-2 for bf16 PyTorch); a float32
    d_a took 3.0 ms against 1.5.
    """
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    kept = kept_chunk(stats, m, _kept_planes(kind, a.dtype))  # (h, products, E) or None
    stats = stats.to(ct)
    bf16_gemms = a.dtype == torch.bfloat16
    # Gb lands in gb; without d_a it is still wanted for d_scale unless G^T a is computed anyway
    # (float32 d_scale from bf16's d_b would see its rounding)
    gb_rows = n if (need_a or not need_b or bf16_gemms) else 0
    bf16_out = bf16_gemms and n * m >= BF16_OUT_MIN_LOGITS
    gb = torch.empty(gb_rows, a.shape[1], dtype=a.dtype if bf16_out else ct, device=a.device)
    # bf16: d_b = (s G)^T @ a_c straight from the transposed view (2048 x 2048 x 512: 2.7 ms, against
    # 3.7 for a_c^T made contiguous, its product, and that transposed back); chunks summed in float32
    # chunk 0 writes d_b, later chunks add to it
    db = torch.empty(m if need_b and not bf16_gemms else 0, b.shape[1], dtype=ct, device=a.device)
    db_lp = None
    dbias = torch.zeros((), dtype=ct, device=a.device)
    s_num = float(s)
    # bf16: the GEMMs take s G (G where s = 0, scaled after them); softmax folds s into w
    prescaled = bf16_gemms and s_num != 0
    folded = prescaled and kind == "softmax"
    if kind == "softmax":
        w = grad.to(ct) * ((0.5 if symmetric else 1.0) * (s_num if folded else 1.0))
        # z - bias at the positive, plus the loss: the row's (column's) full log-sum-exp of s dot.
        pos = stats[0] - bias.to(ct) if bias is not None else stats[0]
        row = pos + stats[1]
        diag_g = torch.expm1(-stats[1]) * w  # softmax - 1 at the positive, without the cancellation
        if symmetric:
            col = pos + stats[2]
            diag_g += torch.expm1(-stats[2]) * w

        def factors(h: Tensor):
            """alpha (N,), v (N,), k (M,) for E = exp(t - h_i), or None where the columns need their own exp."""
            alpha = w * torch.exp(h - row)
            if not symmetric:
                return alpha, None, None
            top = h.max()
            k = w * torch.exp(top - col)
            if not (bool((top - col).max() <= MAX_COLUMN_GAP) and bool(torch.isfinite(k).all())):
                return None
            return alpha, torch.exp(h - top), k
        fac = factors(kept[0]) if kept is not None and kept[2] is not None else None
        if fac is None:
            if kept is not None and kept[2] is not None:
                kept = None  # far columns need their own exponentials: from recomputed products
            fac = factors(row)
    else:
        w = grad.to(ct)
        bias_c = bias.to(ct) if bias is not None else None
    step = n if kept is not None else _chunk_rows(m)
    rows = min(step, n)
    a_c = _features(a, ct, "a")
    b_c = _features(b, ct, "b") if kept is None or not bf16_out else None  # bf16 GEMMs take b itself
    dot_buf = _chunk_buffer("dot", rows, m, ct, a.device) if kept is None else None
    g_buf = _chunk_buffer("g", rows, m, ct, a.device)
    for r0 in range(0, n, step):
        c = min(step, n - r0)
        rs = slice(r0, r0 + c)
        ar = a_c[rs]
        g = g_buf[:c]
        if kept is not None:
            dot = kept[1]
        elif bf16_gemms:
            with bf16_valued_fp32_gemms(True):
                dot = torch.mm(ar, b_c.T, out=dot_buf[:c])
        else:
            dot = _mm(ar, b_c.T, out=dot_buf[:c])
        if kind == "softmax":
            if fac is not None:
                alpha, v, k = fac
                # the kept E, or exp(s dot - row_i) over the recomputed products
                e = kept[2] if kept is not None else _exp_(torch.add(-row[rs, None], dot, alpha=s_num, out=dot))
                if v is None:
                    torch.mul(e, alpha[rs, None], out=g)
                else:
                    _outer_sum(alpha[rs], v[rs], k, out=g).mul_(e)
            else:  # symmetric, a column far below the top: both softmaxes exponentiated
                _exp_(torch.add(-row[rs, None], dot, alpha=s_num, out=g)).mul_(w[rs, None])
                g.add_(_exp_(torch.add(-col[None, :], dot, alpha=s_num)).mul_(w[None, :]))
            _positives(g, r0, offset).copy_(diag_g[rs])
        else:
            if bias_c is not None:
                torch.add(bias_c, dot, alpha=s_num, out=g)
            else:
                torch.mul(dot, s_num, out=g)
            if offset >= 0:
                _positives(g, r0, offset).neg_()
            # d softplus(u)/du = sigmoid(u), and u = -z at the positive
            g.sigmoid_().mul_(w[rs, None])
            if offset >= 0:
                _positives(g, r0, offset).neg_()
            dbias += g.sum()
        if bf16_gemms:
            if prescaled and not folded:
                g.mul_(s_num)
            # a copy, not a bf16 out= of G's last op: PyTorch computes such an op into a fresh float32
            # temporary and casts it over (4096 page faults a call at 2048 x 2048)
            g_lp = _chunk_buffer("g_lp", rows, m, torch.bfloat16, a.device)[:c].copy_(g)
            if bf16_out:
                torch.mm(g_lp, b, out=gb[rs])
            else:
                gb = _copy_into(gb, rs, _mm(g, b_c, out=gb[rs]))
            if need_b:
                part = torch.mm(g_lp.T, a[rs])
                # one chunk: its bf16 product is d_b; more: summed in float32
                db_lp = part if db_lp is None else (db_lp if db_lp.dtype == ct else db_lp.float()).add_(part)
            continue
        if gb_rows:
            gb = _copy_into(gb, rs, _mm(g, b_c, out=gb[rs]))
        if need_b:
            if r0 == 0:
                db = _mm(g.T, ar, out=db)
            else:
                db = add_linear_f32_(db, g.T, ar.T) if ct == torch.float32 else db.addmm_(g.T, ar)
    dscale = _dot_sum(a_c, gb) if gb_rows else _dot_sum(b_c, db)
    if db_lp is not None:
        db = db_lp
    if prescaled:
        dscale /= s_num
    else:
        gb.mul_(s)
        db.mul_(s)
    da = gb if need_a else gb[:0]
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias
