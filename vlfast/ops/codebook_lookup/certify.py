"""From a low-precision scan of the codebook to the exact argmin: error bounds and certification.

A scan (triton.py, or cuda.py over csrc/codebook_lookup/) computes for every row i and code j the score
    s_ij = alpha_j * <z_i, e_j> + beta_j
with l2:     alpha_j = -2,                 beta_j = ||e_j||^2   (||z_i||^2, constant per row, dropped)
     cosine: alpha_j = -1 / ||e_j|| (0 for a zero code), beta_j = 0
in fp32 with the dot product on tensor cores, and keeps per row the smallest score (best), its
index (ties to the lowest), and the smallest score among all other codes (second).

Error bound (per row; derivation). Let c be the relative error of the scan's dot products,
|<z,e>~ - <z,e>| <= c ||z|| ||e|| (Cauchy-Schwarz on sum |z_k e_k|), E = max_j ||e_j||, u = 2^-24:
  l2:     |beta~ - beta| <= u E^2 (||e||^2 taken in float64, rounded once to fp32); the fma / add that
          forms s rounds once more, <= u (E^2 + 2 ||z|| E) (1 + c); alpha = -2 is exact. So
          |s~ - s| <= 2c ||z|| E + 2u E^2 + 2u ||z|| E (1 + c) <= (2c + 4u) ||z|| E + 4u E^2.
  cosine: alpha~ = alpha (1 + u'), |u'| <= u; |s~ - s| <= c ||z|| + u ||z|| + u ||z|| (1 + c)
          <= (c + 4u) ||z||.
Underflow and flushed subnormals break relative bounds: with P products per feature (P = 1, or 3 for
fp32 below), each of the ~2 P D + 4 operations may lose up to 2^-126 times |alpha| (<= 2 for l2, max
|alpha| for cosine), and a flushed subnormal input loses at most 2^-126 |other factor|,
<= 2^-126 P sqrt(D) (||z|| + E) per dot; both are added. The definition in
reference.py (float64, ordered sums) is itself within (D + 3) 2^-53 (||z|| + E)^2 (l2) or
(D + 3) 2^-53 ||z|| (cosine) of the exact value; that is added too, so that certifying against the
exact value certifies against the float64 definition. The whole is multiplied by 1.25.
If every other score exceeds the best by more than 2 eps_i, the best is the definition's argmin:
    certain_i = (min(second_i, FLT_MAX) - best_i) / 2 > eps_i   (in float64)
NaN or infinite quantities (non-finite z, fp32 overflow) make the test false, never true: rows whose
scores could overflow fp32 get eps = inf (so a finite eps_i also means a finite best_i). The other rows
are re-scored exactly by reference.exact_indices (float64 GEMM filter + the definition), on the scan's
device; a scan that can score those rows again in its own arithmetic instead passes lookup a rescore
that takes the codes within 2 eps_i of the row's best as the candidates (the argmin's scan score is
within 2 eps_i of the best).

The scan's c is a model of the hardware: fp16 / bf16 products are exact in fp32, and the tensor
cores' fp32 accumulation is taken to err by at most 4 units of 2^-24 per added term (round-toward-zero
and block alignment: twice and twice again the round-to-nearest bound), so c = (D + 32) 2^-22.
fp32 inputs use bf16x3 (Triton's, and the CUDA scan's split pre-pass): x = hi + mid + r with
hi = bf16(x), mid = bf16(x - hi), both rounded to nearest. For x in [2^e, 2^(e+1)), |x - hi| <= 2^(e-8)
(equality leaves r = 0, else x - hi lies below 2^(e-8) and rounds to 8 bits within 2^(e-17)), so
|mid| <= 2^-8 |x|, |r| <= 2^-17 |x|, |hi| <= (1 + 2^-8) |x|. The P = 3 products hi*hi + hi*mid + mid*hi
are exact in fp32 and miss xy by hi_x r_y + r_x hi_y + mid_x mid_y + (smaller terms)
<= 2^-15 (1 + 2^-8) |x y| (random inputs reach 0.92 * 2^-15); their absolute sum is at most
(1 + 2^-6) |x y|, and 3D of them are accumulated: c = (2^-15 + (3 D + 32) 2^-22) (1 + 2^-6). Three bf16
products cost less than tf32x3's three tf32 ones and certify about as many rows, since for D >= 64 the
accumulation term dominates. The GPU tests with planted near-ties (gaps down to 1e-7) check the model.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ... import _workspace
from . import reference

U32 = 2.0 ** -24
FLT_MAX = float(torch.finfo(torch.float32).max)
SAFETY = 1.25
# |scores| beyond this may overflow fp32 inside the scan: such rows are never certified.
OVERFLOW = 2.0 ** 126
# Elements of one float64 chunk of row_norms64 on a CPU (2 MiB, kept between calls).
NORM_CHUNK_ELEMENTS = 1 << 18
# Up to this many features (and one chunk's elements), vector_norm with a float64 accumulator reads the
# rows directly, without the copy: 0.020 against 0.031 ms at 1024 x 64 (at D = 256 the copy is faster).
DIRECT_NORM_MAX_D = 128


def dot_error(dtype: torch.dtype, d: int) -> float:
    """c for the scan's dot products of inputs in `dtype` with feature dimension d (see above)."""
    if dtype == torch.float32:
        return (2.0 ** -15 + (3 * d + 32) * 2.0 ** -22) * (1 + 2.0 ** -6)
    return (d + 32) * 2.0 ** -22


def products(dtype: torch.dtype) -> int:
    """P: products the scan forms per feature (bf16x3 for float32 inputs, one for 16-bit ones)."""
    return 3 if dtype == torch.float32 else 1


def row_norms64(x: Tensor, name: str) -> Tensor:
    """(R,) float64 norms of x's rows (R, D), vector_norm's bits. On a CPU large rows are converted in
    chunks into the scratch buffer `name`: a fresh float64 copy was faulted in page by page on every
    call (1.7 ms of a 2048 x 4096 x 256 lookup, 0.25 ms of a 4096 x 1024 x 64 one)."""
    r, d = x.shape
    if x.device.type != "cpu" or x.dtype == torch.float64 or x.numel() == 0 or \
            (d <= DIRECT_NORM_MAX_D and x.numel() <= NORM_CHUNK_ELEMENTS):
        return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64)
    step = max(1, NORM_CHUNK_ELEMENTS // d)
    chunk = _workspace.matrix(f"codebook_lookup.{name}", min(step, r), d, torch.float64, x.device)
    out = torch.empty(r, dtype=torch.float64, device=x.device)
    for r0 in range(0, r, step):
        c = min(step, r - r0)
        torch.linalg.vector_norm(chunk[:c].copy_(x[r0:r0 + c]), dim=1, out=out[r0:r0 + c])
    return out


def row_norm_bounds(x: Tensor) -> Tensor:
    """(R,) float64 upper bounds on the norms of x's rows (R, D), for score_error, whose terms only grow
    with them. float32 rows on a CPU: from torch's float32 norm n, whose sum S~ of the squares (in any
    order and precision) meets S <= (S~ + 2 D 2^-126)(1 + 2 gamma_(D+1)) (each square and each addition
    rounds once, or flushes at most 2^-126), and S~ <= n^2 (1 + 4u) (n rounded once from sqrt(S~)): so
    |x| <= sqrt(n^2 a + b), a = (1 + 4u)(1 + 2 gamma_(D+1)), b = 2 D 2^-126 (1 + 2 gamma_(D+1)), raised
    by 2^-50 for these float64 operations and constants. A sum past float32's range gives inf: eps = inf,
    and the row is re-scored. (~0.03 ms at 2048 x 64, against ~0.13 for row_norms64 in a lookup.)
    Elsewhere row_norms64's float64 norms."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() == 0:
        return row_norms64(x, "row_norms")
    d = x.shape[1]
    gamma = (d + 1) * U32 / (1 - (d + 1) * U32)
    n = torch.linalg.vector_norm(x, dim=1).double()
    floor = torch.tensor(2 * d * 2.0 ** -126 * (1 + 2 * gamma), dtype=torch.float64)
    return torch.addcmul(floor, n, n, value=(1 + 4 * U32) * (1 + 2 * gamma)).sqrt_().mul_(1 + 2.0 ** -50)


def codebook_terms(e: Tensor, metric: str) -> dict:
    """alpha, beta (K,) fp32 for the scan, and float64 0-d E = max ||e_j||, max |alpha|, all-finite flag."""
    norm = row_norms64(e, "codebook_norms")
    max_norm = norm.amax() if norm.numel() else norm.new_zeros(())
    # float32 / 16-bit values: an inf or NaN makes its row's float64 norm one, a finite row's cannot
    finite = _all_finite(e) if e.dtype == torch.float64 else max_norm < math.inf  # (NaN < inf is false)
    if metric == "l2":
        return {"alpha": torch.full_like(norm, -2.0, dtype=torch.float32), "beta": norm.square().float(),
                "max_norm": max_norm, "max_alpha": norm.new_full((), 2.0), "finite": finite}
    alpha64 = norm.reciprocal().neg_().nan_to_num_(neginf=0.0)  # -1 / ||e||, 0 for a zero code
    return {"alpha": alpha64.float(), "beta": torch.zeros_like(norm, dtype=torch.float32), "max_norm": max_norm,
            "max_alpha": -alpha64.amin() if norm.numel() else norm.new_zeros(()), "finite": finite}


def _all_finite(x: Tensor) -> Tensor:
    """0-d bool: x holds no inf or NaN (max |x| propagates NaN; 4x faster than isfinite(x).all() on a CPU)."""
    return x.abs().amax() < math.inf if x.numel() else torch.ones((), dtype=torch.bool, device=x.device)


def score_error(norm_z: Tensor, terms: dict, d: int, c: float, metric: str, products: int = 1,
                beta_in_dot: bool = False) -> Tensor:
    """eps_i (N,) float64: a bound on |scan score - exact score| for every code, plus the definition's
    own float64 error; inf where fp32 could overflow (derivation in the module docstring).
    beta_in_dot (l2): the scan sums beta~ as one more term of its dot product <[z, 1], [-2 e, beta~]>
    (or the GEMM adds it, as addmm's matrix or a bias: the same D + 1 terms in another order; c then
    covers D + 1 terms), so the sum's error also scales |beta~| <= (1 + u) E^2: c E^2 more.

    With n = ||z_i||, E, scale = |alpha| (2 for l2), P products and q = (D + 3) 2^-52, the sum of
        relative     l2: (2c + 4u) n E + (4u + c [beta_in_dot]) E^2     cosine: (c + 4u) n
        definition   l2: q (n + E)^2                                     cosine: q n
        tiny         2^-126 scale ((2 P D + 4) + P sqrt(D) (n + E))
    times SAFETY is a polynomial in n: eps = SAFETY (q' n^2 + lin n + const) (q' = q for l2, 0 for cosine),
    whose 0-d coefficients are formed once, so that each row takes one or two operations."""
    big_e, scale = _on_host(terms["max_norm"]), _on_host(terms["max_alpha"])
    q = (d + 3) * 2.0 ** -52
    flush, spread = 2.0 ** -126 * (2 * products * d + 4), 2.0 ** -126 * products * math.sqrt(d)
    if metric == "l2":
        lin = ((2 * c + 4 * U32 + 2 * q) * big_e + 2 * spread) * SAFETY
        const = ((4 * U32 + c * beta_in_dot + q) * big_e ** 2 + 2 * (flush + spread * big_e)) * SAFETY
        # the largest score E^2 + 2 n E (1 + c) stays below OVERFLOW
        # (a 0-d tensor E = 0 divides to inf; a float would raise)
        limit = (OVERFLOW - big_e ** 2) / (2 * (1 + c) * big_e) if isinstance(big_e, Tensor) or big_e else math.inf
        n = torch.where(norm_z < limit, norm_z, math.inf)
        return torch.add(lin, n, alpha=q * SAFETY).mul_(n).add_(const)
    lin = (c + 4 * U32 + q + scale * spread) * SAFETY
    const = scale * (flush + spread * big_e) * SAFETY
    # the largest of n E, n, scale and E stays below OVERFLOW
    if isinstance(big_e, Tensor):
        limit = torch.where(torch.maximum(scale, big_e) < OVERFLOW, OVERFLOW / big_e.clamp(min=1.0), 0.0)
    else:
        limit = OVERFLOW / max(big_e, 1.0) if scale < OVERFLOW and big_e < OVERFLOW else 0.0
    return torch.where(norm_z < limit, norm_z, math.inf).mul_(lin).add_(const)


def _on_host(x: Tensor):
    """A 0-d tensor's value as a float where reading it costs no device sync (a CPU tensor): score_error's
    coefficients are then a few float operations, where each 0-d tensor operation took a few µs."""
    return x.item() if x.device.type == "cpu" else x


def certain_rows(best: Tensor, second: Tensor, eps: Tensor) -> Tensor:
    """(N,) bool: the scan's best index is the definition's argmin."""
    # A NaN best or eps, an infinite best or eps, or a gap NaN or -inf make the test false. (-inf best:
    # an infinite gap, but only a scan overflow gives it, which a finite eps rules out: |score| < OVERFLOW.)
    return second.double().clamp_(max=FLT_MAX).sub_(best).mul_(0.5) > eps


Scan = Callable[[Tensor, Tensor, Tensor, Tensor], tuple]
Distances = Callable[[Tensor, Tensor, Tensor, str], Tensor]
# rescore(z, e, metric, rows, eps of those rows, terms) -> the definition's argmin of z[rows]
Rescore = Callable[[Tensor, Tensor, str, Tensor, Tensor, dict], Tensor]


def _exact_indices(z: Tensor, e: Tensor, metric: str, rows: Tensor, eps: Tensor, terms: dict) -> Tensor:
    return reference.exact_indices(z, e, metric, rows)


def lookup(z: Tensor, e: Tensor, metric: str, scan: Scan, distances: Distances, c: float,
           products: int = 1, beta_in_dot: bool = False, rescore: Rescore = _exact_indices) -> tuple:
    """(indices (N,) int64, distances (N,) float32, rows re-scored) from a scan with dot error c and
    `products` products per feature (see score_error, also for beta_in_dot).

    scan(z, e, alpha, beta) -> (best (N,) fp32, second (N,) fp32, index (N,) int);
    distances(z, e, index, metric) -> (N,) float32 by the definition; rescore: the uncertain rows' exact
    indices (reference.exact_indices unless the scan can narrow them itself). One host sync.
    """
    terms = codebook_terms(e, metric)
    eps = score_error(row_norm_bounds(z), terms, z.shape[1], c, metric, products, beta_in_dot)
    best, second, index = scan(z, e, terms["alpha"], terms["beta"])
    certain = certain_rows(best, second, eps)
    if z.device.type == "cpu":
        count, finite = z.shape[0] - int(certain.sum()), bool(terms["finite"])
    else:  # one host sync
        count, finite = torch.stack([z.shape[0] - certain.sum(), terms["finite"].long()]).tolist()
    if not finite:
        reference.check_finite("codebook", e)
    index = index.long()
    if count:
        rows = (~certain).nonzero().squeeze(1)
        index[rows] = rescore(z, e, metric, rows, eps[rows], terms)
    return index, distances(z, e, index, metric), count
