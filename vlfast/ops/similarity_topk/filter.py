"""The GPU kernels' algorithm: a low-precision pass that emits every key near the top, certified, then
float64 scores for the few that matter. Shared by the Triton and CUDA kernels, which only `emit`.

Per row i and key j a kernel scores s_ij = alpha_j <q_i, k_j> + beta_j in fp32 (tensor cores; float32
inputs as bf16x3), with the codebook scan's arithmetic and so its error model
(codebook_lookup/certify.py; eps_i below bounds |s_ij - exact| for every key, in the same units):
  ip:     alpha = 1,        beta = 0
  cosine: alpha = 1 / |k|,  beta = 0         (s = |q_i| times the cosine: one scale per row)
  l2:     alpha = 2,        beta = -|k|^2    (s = |q_i|^2 minus the squared distance)
and writes each pair with s_ij >= t_i into row i's candidate buffer, counting them all (count_i is
exact even past the buffer's capacity). The thresholds t_i come from a sample of the keys (every
stride-th): its j-th largest score, j chosen so that the sample very probably holds fewer than j of
the row's top k, minus 4 eps_i (the sample's GEMM is not the kernel's) and a margin for its rounding. Nothing rests on the
sample being good: a row is certified when
  count_i <= capacity, count_i >= k, and t_i <= s_(k) - 2 eps_i   (s_(k): the k-th largest emitted),
for then every key within 2 eps_i of the fp32 k-th score was emitted, and those hold the exact top k
(torch_impl.py's argument). The keys of a certified row that are within 2 eps_i of s_(k) are scored by
the definition (reference.pair_scores, the same bits on every path) and the exact top k taken; rows
not certified (a poor sample, masses of near-ties) take the torch path whole. Memory: the candidate
buffers of a chunk of rows, never N x M.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ..codebook_lookup import certify as codebook_certify
from . import torch_impl

# Emit(q, keys, alpha, beta, threshold, capacity) -> (count (N,) int32, cols (N, capacity) int32,
# scores (N, capacity) fp32): the kernels' contract (module docstring).
Emit = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int], tuple]

SAMPLE_MIN = 4096  # keys in the threshold sample at least (all of them when M is smaller)
SAMPLE_FRACTION = 64  # and M / 64 of them otherwise: 1.6 % of the main pass's work
BUFFER_ELEMENTS = 1 << 25  # candidate slots per chunk of rows (256 MiB of cols + scores)
SAMPLE_SCORES = 1 << 24  # the sample's scores per block of rows (64 MiB at fp32)
U32 = 2.0 ** -24


def key_terms(keys: Tensor, metric: str) -> dict:
    """alpha, beta (M,) fp32 for the kernels, and codebook certify's float64 max_norm / max_alpha."""
    if metric == "ip":
        norm = torch.linalg.vector_norm(keys, dim=1, dtype=torch.float64)
        ones = torch.ones(keys.shape[0], dtype=torch.float32, device=keys.device)
        return {"alpha": ones, "beta": torch.zeros_like(ones), "max_norm": norm.max(),
                "max_alpha": torch.ones((), dtype=torch.float64, device=keys.device)}
    terms = codebook_certify.codebook_terms(keys, metric)  # the codebook's: smaller is nearer
    return {**terms, "alpha": -terms["alpha"], "beta": -terms["beta"]}


def score_error(norm_q: Tensor, terms: dict, d: int, c: float, metric: str, products: int) -> Tensor:
    """eps_i (N,) float64: |kernel score - exact score| for every key, plus the definition's own float64
    error; inf where fp32 could overflow. l2 and cosine are the codebook's bounds (the same magnitudes,
    signs flipped); ip is its cosine bound without the division: c |q| E for the dot product, with the
    same headroom for rounding."""
    if metric != "ip":
        return codebook_certify.score_error(norm_q, terms, d, c, metric, products)
    big_e = terms["max_norm"]
    relative = (c + 4 * U32) * norm_q * big_e
    definition = (d + 3) * 2.0 ** -52 * norm_q * big_e
    tiny = 2.0 ** -126 * ((2 * products * d + 4) + products * math.sqrt(d) * (norm_q + big_e))
    eps = codebook_certify.SAFETY * (relative + definition + tiny)
    return torch.where(norm_q * big_e < codebook_certify.OVERFLOW, eps, float("inf"))


def _round_down(x: Tensor) -> Tensor:
    """float64 -> the float32 at or below it (-inf for -inf or NaN, never above x)."""
    y = x.float()
    y = torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)
    return torch.where(torch.isnan(y), -float("inf"), y)


def sample_plan(m: int, k: int) -> tuple[int, int]:
    """(stride, j): the sample is keys[::stride]; the threshold its j-th largest score. j exceeds the
    expected number lam of the row's top k in the sample by 5 sqrt(lam) + 4 (a Poisson tail of about
    1e-6), so the j-th sampled score very probably ranks past k among all keys."""
    stride = max(1, m // max(SAMPLE_MIN, m // SAMPLE_FRACTION))
    size = -(-m // stride)
    if stride == 1:
        return 1, k
    lam = k * size / m
    return stride, min(size, math.ceil(lam + 5 * math.sqrt(lam) + 4))


def capacity(m: int, k: int) -> int:
    """Candidate slots per row: room for the sample's j-th score ranking far past its expected j stride
    among all keys (by 5 sqrt(j) + 4 of j's units, and a quarter more for the 4 eps band), and k + 64."""
    stride, j = sample_plan(m, k)
    if stride == 1:
        return min(m, k + 64)
    return min(m, k + 64 + math.ceil(1.25 * stride * (j + 5 * math.sqrt(j) + 4)))


def thresholds(q: Tensor, keys: Tensor, terms: dict, eps: Tensor, k: int) -> Tensor:
    """t (R,) fp32 for rows q (R, D): the sample's j-th score, less 4 eps and its rounding margin
    (a guess: certification does not rely on it). The sample's scores a block of rows at a time."""
    stride, j = sample_plan(keys.shape[0], k)
    sample = keys[::stride]
    alpha, beta = terms["alpha"][::stride], terms["beta"][::stride]
    guess = torch.empty(q.shape[0], dtype=torch.float64, device=q.device)
    step = max(1, SAMPLE_SCORES // sample.shape[0])
    for r0 in range(0, q.shape[0], step):
        dots = (q[r0:r0 + step] @ sample.T).float()
        top = (dots * alpha + beta).topk(j, dim=1)
        g = top.values[:, -1].double()
        if q.element_size() == 2:  # a 16-bit GEMM's output keeps 8 or 11 bits: allow 2^-8 of the product
            at = top.indices[:, -1:]
            g = g - 2.0 ** -8 * (dots.gather(1, at) * alpha[at]).abs().squeeze(1).double()
        guess[r0:r0 + step] = g
    # 4 eps: the guess and the kernel's score of the same key may differ by 2 eps (two fp32 GEMMs)
    return _round_down(guess - 4 * eps)


def _certified(count: Tensor, cols: Tensor, scores: Tensor, t: Tensor, eps: Tensor, k: int) -> tuple:
    """(ok (R,) bool, needed (R, cap) bool): the certified rows, and the slots to score exactly."""
    cap = cols.shape[1]
    valid = torch.arange(cap, device=cols.device)[None, :] < count.clamp(max=cap)[:, None].long()
    values = torch.where(valid, scores, -float("inf"))
    kth = values.topk(k, dim=1).values[:, -1]
    floor = _round_down(kth.double() - 2 * eps)  # at or below s_(k) - 2 eps
    ok = (count <= cap) & (count >= k) & (floor >= t) & torch.isfinite(kth)
    return ok, valid & (values >= floor[:, None]) & ok[:, None]


def search(q: Tensor, keys: Tensor, k: int, metric: str, emit: Emit, c: float, products: int, stats: dict,
           pair_scores: Optional[torch_impl.PairScores] = None) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, scores (N, k) float64), exactly reference.similarity_topk's, from a
    kernel's emit with dot error c and `products` products per feature, and the candidates' float64
    scores from pair_scores (the definition's bits; None: PyTorch's). stats gets the rows that took
    the torch path ("fallback") and the candidates scored exactly ("rescored")."""
    n, d = q.shape
    m = keys.shape[0]
    terms = key_terms(keys, metric)
    eps_all = score_error(torch.linalg.vector_norm(q, dim=1, dtype=torch.float64), terms, d, c, metric, products)
    cap = capacity(m, k)
    index = torch.empty(n, k, dtype=torch.int64, device=q.device)
    score = torch.empty(n, k, dtype=torch.float64, device=q.device)
    step = max(1, BUFFER_ELEMENTS // cap)
    fallback = rescored = 0
    for r0 in range(0, n, step):
        rows, eps = q[r0:r0 + step], eps_all[r0:r0 + step]
        t = thresholds(rows, keys, terms, eps, k)
        count, cols, scores = emit(rows, keys, terms["alpha"], terms["beta"], t, cap)
        ok, needed = _certified(count, cols, scores, t, eps, k)
        good = ok.nonzero().squeeze(1)
        bad = (~ok).nonzero().squeeze(1)
        if good.numel():
            slot_row, slot = needed[good].nonzero(as_tuple=True)
            col = cols[good][slot_row, slot].long()
            order = torch.sort(slot_row * m + col).indices  # row-major, columns ascending (ties: lower index)
            pair_row, col = slot_row[order], col[order]
            found = torch_impl.exact_among(rows[good], keys, pair_row, col, k, metric, pair_scores)
            index[r0 + good], score[r0 + good] = found
            rescored += col.numel()
        if bad.numel():
            index[r0 + bad], score[r0 + bad] = torch_impl.similarity_topk(rows[bad], keys, k, metric)
            fallback += bad.numel()
    stats.update(rows=n, fallback=fallback, rescored=rescored)
    return index, score
