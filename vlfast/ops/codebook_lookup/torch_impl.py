"""Exact codebook lookup as a composition of PyTorch's own kernels: impl="torch", the CPU fast path.

A float32 GEMM scan (torch.mm on chunks of rows, the score's constants folded into the GEMM's
operands, or l2's beta added by the GEMM itself; oneDNN's float32 GEMM where it beats torch.mm's BLAS,
vlfast._gemm.linear_f32; then two row minima) gives each row's best score, its index and the second-best score;
certify.py's bound on the scan's error keeps the rows whose gap proves the pick; for the others the
scan's scores again leave a handful of candidates, scored by the definition in float64 (_rescore).
bf16 / fp16 inputs are upcast to float32 (their products are then exact); bf16 ones take oneDNN's bf16
GEMM mode (exact products, float32 accumulation: clip_loss.torch_impl.bf16_valued_fp32_gemms).
Extra memory: one (rows x K) float32 chunk of CHUNK_ELEMENTS, kept per thread between calls, plus
O((N + K) D).

Shapes: z (N, D), e (K, D) -> indices (N,) int64, distances (N,) float32.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from ... import _workspace
from ..._gemm import cpu_fp32_gemm, ieee_fp32_gemms, linear_f32
from ..clip_loss.torch_impl import bf16_valued_fp32_gemms
from . import certify, reference

# Elements of one score chunk (16 MiB at float32); tests shrink it to force several chunks.
CHUNK_ELEMENTS = 1 << 22


def dot_error(d: int) -> float:
    """c for a float32 GEMM over D terms in IEEE float32 (lookup checks _gemm.ieee_fp32_gemms): in any
    order of evaluation, blocked, fused or not, |fl(sum x_k y_k) - sum x_k y_k| <= gamma_D sum |x_k y_k|
    with gamma_D = D u / (1 - D u), u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms,
    (3.5)); score_error adds certify.SAFETY on top. (It was taken four times over, as the GPU scans'
    model of tensor cores is: a CPU's GEMM needs no such allowance, and the tighter bound leaves the
    float64 re-scoring no rows in most lookups: 2048 x 1024 x 64 cosine, 3 rows -> 0.)"""
    return d * 2.0 ** -24 / (1 - d * 2.0 ** -24)


# Lanes of the two-level minimum: lane l holds codes l, l + LANES, l + 2 LANES, ...; the value-only
# minimum across lanes is an elementwise minimum of contiguous rows, which a CPU runs at memory
# speed, where a minimum that tracks its index over K codes costs several times more.
LANES = 32


def _best_two(scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(best (R,), second (R,), index (R,)) of scores (R, K): the minimum, its index and the minimum of
    the other codes; second is inf when K = 1.

    Two levels: each lane's minimum (value only), the winning lane, then the winner among its codes.
    The last K mod LANES codes are lanes of one code each. Where equal minima tie, the index may not
    be the lowest, but then second == best: such rows are never certified and the exact re-score
    decides them. The (R, lanes) and (R, K / lanes) intermediates live in scratch buffers: fresh ones
    were faulted in on every call (~150 faults, 0.2 ms at R = 4096).
    """
    r, k = scores.shape
    lanes = min(LANES, k)
    groups = k // lanes  # codes g * lanes + l for g < groups; the tail k - groups * lanes follows
    tail = k - groups * lanes

    def scratch(name, numel, dtype=torch.float32):
        return _workspace.buffer(f"codebook_lookup.best_two.{name}", numel, dtype, scores.device)

    by_lane = scores[:, :groups * lanes].view(r, groups, lanes)
    # one row of scratch per score row: the lanes' minima, then the winning lane's codes, so that one
    # scatter and one minimum give the second best of both
    width = lanes + tail
    pool = scratch("pool", r * (width + groups)).view(r, width + groups)
    lane_min, inside = pool[:, :width], pool[:, width:]
    torch.amin(by_lane, dim=1, out=lane_min[:, :lanes])
    if tail:
        lane_min[:, lanes:] = scores[:, groups * lanes:]
    # each row's winners: the lane (column 0) and the code inside it (column 1, as a place in pool)
    winners = scratch("winners", r * 2, torch.int64).view(r, 2)
    lane_best, lane = scratch("lane_best", r), winners[:, 0]
    torch.min(lane_min, dim=1, out=(lane_best, lane))  # min with indices runs faster than argmin on a CPU
    # the winning lane's codes (a tail winner reads lane LANES - 1 instead: real codes, not the winner)
    winner = lane.clamp(max=lanes - 1) if tail else lane
    torch.gather(by_lane, 2, winner.view(r, 1, 1).expand(r, groups, 1), out=inside.view(r, groups, 1))
    best, at = inside.min(dim=1)
    index = torch.add(lane, at, alpha=lanes)
    if tail:
        in_tail = lane >= lanes
        best = torch.where(in_tail, lane_best, best)
        index = torch.where(in_tail, lane + (groups - 1) * lanes, index)
    # every code but the winner: the other lanes' minima and the gathered lane's other codes (for a tail
    # winner, lane LANES - 1's minimum is among the former and its second among the latter)
    torch.add(at, width, out=winners[:, 1])
    second = pool.scatter_(1, winners, float("inf")).amin(dim=1)
    return best, second, index


# l2 float32 / float16 with torch.mm's BLAS (vlfast._gemm.cpu_fp32_gemm), from this many features on:
# beta joins as addmm's added matrix, not as a GEMM feature. One feature more crosses a k-block of
# MKL's GEMM at D = 256 (1024 x 4096: 11.3 against 10.1 ms, measured on a Zen 5 core pair), while
# addmm's pass writing beta into the output first is small next to a GEMM this deep; below it, the
# extra feature is free and that pass is not.
ADDMM_MIN_D = 128


def _form(metric: str, dtype: torch.dtype, d: int) -> str:
    """How _scores forms s = alpha_j <z, e_j> + beta_j:
    "feature"  l2, one GEMM over [z, 1] and [-2 e, beta] (BLAS, D < ADDMM_MIN_D);
    "bias"     l2, z @ (-2 e)^T + beta, beta added by the GEMM (addmm, or oneDNN's bias);
    "scaled"   cosine, z @ (alpha e)^T;
    "bf16_l2" / "bf16_cosine"  the bf16-mode GEMM, then beta added / alpha multiplied in float32.
    "feature" and "bias" both sum beta as one more term of the dot product (lookup's beta_in_dot)."""
    if dtype == torch.bfloat16:
        return f"bf16_{metric}"
    if metric != "l2":
        return "scaled"
    return "bias" if d >= ADDMM_MIN_D or cpu_fp32_gemm() == "onednn" else "feature"


def _codes(e: Tensor, alpha: Tensor, beta: Tensor, form: str) -> Tensor:
    """The GEMM's right operand (K, D, or D + 1 for "feature") float32 (see _form).

    l2: alpha = -2 folds into the codebook exactly ("feature": beta as the last feature). Cosine: alpha
    folded into the codebook (rounded once: the bound is unchanged). bf16: never rounded to bf16 itself.
    Written into a scratch buffer (kept between calls): a fresh one was faulted in on every call.
    """
    k, d = e.shape
    codes = _workspace.matrix("codebook_lookup.codes", k, d + (form == "feature"), torch.float32, e.device)
    if form in ("feature", "bias", "bf16_l2"):
        codes[:, :d].copy_(e).mul_(-2.0)  # in float32: -2 e would overflow float16 past 32768
        if form == "feature":
            codes[:, d] = beta
    elif form == "bf16_cosine":
        codes.copy_(e)
    else:
        torch.mul(e, alpha[:, None], out=codes)  # float32 alpha: computed in float32
    return codes


def _scores(rows: Tensor, codes: Tensor, alpha: Tensor, beta: Tensor, form: str, out: Tensor) -> Tensor:
    """s (C, K) float32, for rows (C, D + 1) = [z, 1] ("feature") or z (C, D) float32: into out, or a
    fresh tensor where the float32 GEMM is oneDNN's (vlfast._gemm.linear_f32)."""
    if not form.startswith("bf16"):
        return linear_f32(rows, codes, beta if form == "bias" else None, out=out)
    with bf16_valued_fp32_gemms(True):  # exact products, float32 sums, float32 result
        scores = torch.mm(rows, codes.T, out=out)
    return scores.add_(beta) if form == "bf16_l2" else scores.mul_(alpha)


def _scan(z: Tensor, e: Tensor, alpha: Tensor, beta: Tensor, *, metric: str,
          held: Optional[dict] = None) -> tuple[Tensor, Tensor, Tensor]:
    """best (N,) fp32, second (N,) fp32 (inf when K = 1), index (N,) of s = alpha_j <z_i, e_j> + beta_j
    (certify.codebook_terms' alpha and beta for `metric`); held: a dict that gets the GEMM's operand and
    form ("codes", "form") for _rescore."""
    n, (k, d) = z.shape[0], e.shape
    form = _form(metric, z.dtype, d)
    codes = _codes(e, alpha, beta, form)
    if held is not None:
        held.update(codes=codes, form=form)
    step = max(1, CHUNK_ELEMENTS // max(1, k))
    # kept between calls (vlfast._workspace): a fresh 16 MiB chunk cost ~4 ms of page faults a call
    buf = _workspace.matrix("codebook_lookup.scores", min(step, n), k, torch.float32, z.device)
    rows_in = None
    if form == "feature":  # [z, 1] per chunk
        rows_in = _workspace.matrix("codebook_lookup.rows", min(step, n), d + 1, torch.float32, z.device)
        rows_in[:, d] = 1.0

    def best_two(r0: int, c: int) -> tuple[Tensor, Tensor, Tensor]:
        if rows_in is not None:
            zc = rows_in[:c]
            zc[:, :d] = z[r0:r0 + c]
        else:
            zc = z[r0:r0 + c].float()
        return _best_two(_scores(zc, codes, alpha, beta, form, buf[:c]))

    if n <= step:  # one chunk: _best_two's results (fresh tensors) are the outputs
        return best_two(0, n)
    best = torch.empty(n, dtype=torch.float32, device=z.device)
    second = torch.empty(n, dtype=torch.float32, device=z.device)
    index = torch.empty(n, dtype=torch.int64, device=z.device)
    for r0 in range(0, n, step):
        c = min(step, n - r0)
        rows = slice(r0, r0 + c)
        best[rows], second[rows], index[rows] = best_two(r0, c)
    return best, second, index


def _rescore(z: Tensor, e: Tensor, metric: str, rows: Tensor, eps: Tensor, terms: dict, held: dict) -> Tensor:
    """The definition's argmin (R,) for the uncertain rows z[rows], from their scan scores again.

    Every score of the scan is within eps_i of the exact one, so the argmin's score is within 2 eps_i of
    the row's best: the codes there are the candidates (a handful), scored by the definition in float64
    (reference.best_candidate). A row whose bound is not finite (fp32 could overflow) takes every code.
    reference.exact_indices instead converts the whole codebook and runs a float64 GEMM: 1.6 ms for a
    few rows against 4096 x 256 codes, most of the lookup's time after the scan. held: what _scan held
    (its GEMM operand, so that the scores are the scan's own arithmetic)."""
    zr = z[rows]
    reference.check_finite("z", zr, rows)
    k = e.shape[0]
    alpha, beta, codes, form = terms["alpha"], terms["beta"], held["codes"], held["form"]
    out = torch.empty(zr.shape[0], dtype=torch.int64, device=z.device)
    step = max(1, CHUNK_ELEMENTS // max(1, k))
    for r0 in range(0, zr.shape[0], step):
        zc = zr[r0:r0 + step]
        rows_in = torch.cat([zc.float(), zc.new_ones(zc.shape[0], 1, dtype=torch.float32)], dim=1) \
            if form == "feature" else zc.float()
        scores = _scores(rows_in, codes, alpha, beta, form, torch.empty(zc.shape[0], k, device=z.device))
        threshold = scores.amin(dim=1).double() + 2 * eps[r0:r0 + step]
        # in float32, rounded up (a float64 comparison converted the whole block first)
        limit = threshold.float()
        limit = torch.where(limit.double() < threshold, torch.nextafter(limit, limit.new_tensor(float("inf"))), limit)
        candidates = scores <= limit[:, None]
        if not bool(torch.isfinite(threshold).all()):  # NaN / overflow: every code of such a row
            candidates |= ~torch.isfinite(threshold)[:, None]
        out[r0:r0 + step] = reference.best_candidate(zc.double(), e, candidates, metric)
    return out


def lookup(z: Tensor, e: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N,) int64, distances (N,) float32), exactly the definition's argmin (reference.py)."""
    if z.dtype == torch.float64 or not ieee_fp32_gemms(z.device):
        # float64 inputs, or float32 GEMMs allowed to drop precision (bf16 / tf32): no float32 bound holds.
        return reference.lookup(z, e, metric)
    # _scan's GEMM sums D + 1 terms: beta as a feature or added by the GEMM
    beta_in_dot = _form(metric, z.dtype, z.shape[1]) in ("feature", "bias")
    held = {}  # the scan's GEMM operand, for the rescore of the uncertain rows
    index, dist, _ = certify.lookup(z, e, metric, functools.partial(_scan, metric=metric, held=held),
                                    reference.chosen_distances, dot_error(z.shape[1] + beta_in_dot),
                                    beta_in_dot=beta_in_dot,
                                    rescore=functools.partial(_rescore, held=held))
    return index, dist
