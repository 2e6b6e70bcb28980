"""Exact top-k from PyTorch's own kernels: a float32 GEMM filter, certified, then float64 re-scoring.

Per block of query rows: float32 scores by one GEMM (into a scratch block kept between calls) (cosine: of the rows normalised in float64 first;
l2: 2 <q, k> - |k|^2, the row constant |q|^2 dropped), the k-th largest per row, and every key within
2 eps_i of it as a candidate. eps_i bounds the float32 score's error: (4 D + 16) 2^-24 (|q_i| + max |k|)^2,
four times the recursive-summation bound of the products and norms (the normalised rows, |.| = 1, for
cosine). A key of the true top k scores at least the true k-th score, so its float32 score is within
eps of that and the float32 k-th score within eps too: it is a candidate. The candidates (almost always
little more than k per row) are scored by the definition (reference.pair_scores, the same bits) and the
exact top k chosen among them, ties to the lower index. Memory: one (rows x M) float32 block and its mask,
and the candidates' float64 operands a chunk at a time.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ... import _workspace
from ..._gemm import ieee_fp32_gemms, linear_f32
from . import reference

CHUNK_ELEMENTS = 1 << 22  # float32 scores per block (16 MiB)
# bf16 / fp16 keys up to this size in float32 are converted into a scratch buffer kept between calls
# (vlfast._workspace), as the score blocks are: fresh ones were faulted in page by page on every call
# (512 x 32768 x 128 bf16: ~12000 page faults, 47 against 37 ms).
KEYS32_SCRATCH_BYTES = 1 << 26
PAIR_ELEMENTS = 1 << 21  # float64 elements per chunk of candidate pairs re-scored (16 MiB per operand)
KEYS64_BYTES = 1 << 28  # keys up to this size in float64 are converted once for the re-scoring


def _filter_keys(keys: Tensor, metric: str) -> tuple[Tensor, Tensor, Tensor]:
    """Once per call: (float32 keys (M, D) for the filter's GEMM, the l2 filter's |k|^2 (M,) float32 (or
    an empty tensor), max |k| float64 (of the normalised keys for cosine))."""
    if metric == "cosine":
        k64 = keys.double()
        k64 = k64 / k64.norm(dim=1, keepdim=True).clamp_min(1e-300)
        k32, key_max = k64.float(), k64.norm(dim=1).max()
    else:
        if keys.dtype == torch.float32 or keys.numel() * 4 > KEYS32_SCRATCH_BYTES:
            k32 = keys.float()  # the same float32 values as keys.double().float()
        else:
            k32 = _workspace.matrix("similarity_topk.keys", keys.shape[0], keys.shape[1], torch.float32,
                                    keys.device).copy_(keys)
        # max |k| from float32 norms, raised by their error bound (D + 2) 2^-24 (with room): an upper bound
        key_max = k32.norm(dim=1).max().double() * (1 + (keys.shape[1] + 2) * 2.0 ** -23)
    squares = (k32 * k32).sum(1) if metric == "l2" else k32.new_empty(0)
    return k32, squares, key_max


def _filter(q: Tensor, k32: Tensor, squares: Tensor, key_max: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """(float32 scores (R, M), eps (R,) float64): the filter's scores and their error bound."""
    q64 = q.double()
    if metric == "cosine":
        q64 = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-300)
    # oneDNN where it beats the BLAS (vlfast._gemm.linear_f32): then a fresh block, not the scratch one
    s = linear_f32(q64.float(), k32, out=_workspace.matrix("similarity_topk.scores", q.shape[0], k32.shape[0],
                                                           torch.float32, q.device))
    if metric == "l2":
        s = s.mul_(2).sub_(squares)
    size = q64.norm(dim=1) + key_max
    eps = (4 * q.shape[1] + 16) * 2.0 ** -24 * size ** 2
    return s, eps


def _candidates(s: Tensor, eps: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(row, col) of every key within 2 eps of its row's float32 k-th score, row-major with the columns
    ascending in a row. Read off a top-k' with headroom (k' = k + 8 + k / 8) where the k'-th score is
    already below the threshold (the usual case), from the whole row's mask otherwise."""
    rows, m = s.shape
    top = s.topk(min(m, k + 8 + k // 8), dim=1)
    kth = top.values[:, k - 1].double()
    # the threshold rounded down to float32 (never above the exact one), compared in float32
    threshold = (kth - 2 * eps).float()
    threshold = torch.nextafter(threshold, torch.full_like(threshold, -float("inf")))
    threshold = torch.where(torch.isfinite(threshold), threshold, -float("inf"))  # overflow: every key
    covered = (top.values[:, -1] < threshold) | (top.values.shape[1] == m)
    cols, order = top.indices.sort(dim=1)
    kept = (top.values.gather(1, order) >= threshold[:, None]) & covered[:, None]
    row = torch.arange(rows, device=s.device)[:, None].expand_as(cols)[kept]
    col = cols[kept]
    rest = torch.nonzero(~covered).flatten()
    if rest.numel():  # near-ties past the headroom: these rows' whole masks
        sub_row, sub_col = (s[rest] >= threshold[rest, None]).nonzero(as_tuple=True)
        row, col = torch.cat([row, rest[sub_row]]), torch.cat([col, sub_col])
        by_row = torch.sort(row, stable=True).indices  # keeps each row's columns ascending
        row, col = row[by_row], col[by_row]
    return row, col


# (q, keys, row (P,), col (P,), metric) -> (P,) float64: reference.pair_scores(q[row], keys[col]), its bits
PairScores = Callable[[Tensor, Tensor, Tensor, Tensor, str], Tensor]


def gathered_pair_scores(q: Tensor, keys: Tensor, row: Tensor, col: Tensor, metric: str) -> Tensor:
    """PairScores in PyTorch: the pairs' (P, D) float64 operands gathered a chunk at a time."""
    score = torch.empty(row.numel(), dtype=torch.float64, device=q.device)
    step = max(1, PAIR_ELEMENTS // q.shape[1])
    for p0 in range(0, row.numel(), step):
        score[p0:p0 + step] = reference.pair_scores(q[row[p0:p0 + step]], keys[col[p0:p0 + step]], metric)
    return score


def padded_pair_scores(q: Tensor, keys: Tensor, cols: Tensor, metric: str) -> Tensor:
    """(R, W) float64: reference.pair_scores(q_i, keys[cols[i, w]]), the same bits, each row of q (R, D)
    broadcast against its W candidates instead of gathered, a block of rows at a time."""
    r, w = cols.shape
    d = q.shape[1]
    q64 = q.double()
    # the keys converted once where the candidates outnumber them and that is small (256 MiB), else
    # each block's gathered rows
    once = r * w > keys.shape[0] and keys.numel() * 8 <= KEYS64_BYTES
    source = keys.double() if once else keys
    qq = reference.ordered_row_sums(q64 * q64) if metric == "cosine" else None
    out = torch.empty(r, w, dtype=torch.float64, device=q.device)
    step = max(1, PAIR_ELEMENTS // max(1, w * d))
    for r0 in range(0, r, step):
        qb, kb = q64[r0:r0 + step, None, :], source[cols[r0:r0 + step]].double()  # (b, 1, D), (b, W, D)
        if metric == "l2":
            block = -reference.ordered_row_sums(((qb - kb) ** 2).view(-1, d))
        else:
            block = reference.ordered_row_sums((qb * kb).view(-1, d))
            if metric == "cosine":
                norms_q = qq[r0:r0 + step, None].expand(-1, w).reshape(-1)
                block = reference.cosine_of_sums(block, norms_q, reference.ordered_row_sums((kb * kb).view(-1, d)))
        out[r0:r0 + step] = block.view(-1, w)
    return out


def exact_among(q: Tensor, keys: Tensor, row: Tensor, col: Tensor, k: int, metric: str,
                pair_scores: Optional[PairScores] = None) -> tuple[Tensor, Tensor]:
    """Top k of each of the R = q.shape[0] rows among its candidates (row, col), by the definition.
    (row, col) are row-major with each row's columns ascending, at least k per row; pair_scores gives
    their float64 scores (None: PyTorch's, here). Candidates are laid out (R, W), W the most any row
    has, and sorted per row; when a few rows have far more than the rest (near-ties past a filter's
    headroom), flat instead, so that the layout never holds R x M."""
    r = q.shape[0]
    counts = torch.bincount(row, minlength=r)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max())
    if r * width > 2 * row.numel():
        score = (pair_scores or gathered_pair_scores)(q, keys, row, col, metric)
        # order: by row, then score descending, then column (stable sorts, last key first)
        order = torch.sort(-score, stable=True).indices
        order = order[torch.sort(row[order], stable=True).indices]
        pick = order[(starts[:, None] + torch.arange(k, device=q.device)).reshape(-1)]
        return col[pick].view(-1, k), score[pick].view(-1, k)
    slot = torch.arange(row.numel(), device=q.device) - starts[row]
    cols = torch.zeros(r, width, dtype=torch.int64, device=q.device)
    cols[row, slot] = col
    valid = torch.zeros(r, width, dtype=torch.bool, device=q.device)
    valid[row, slot] = True
    if pair_scores is None:
        score = padded_pair_scores(q, keys, cols, metric)  # the padding scores key 0, masked below
    else:
        score = torch.zeros(r, width, dtype=torch.float64, device=q.device)
        score[row, slot] = pair_scores(q, keys, row, col, metric)
    score = score.masked_fill(~valid, -float("inf"))
    order = torch.sort(-score, dim=1, stable=True).indices[:, :k]  # equal scores keep the lower column first
    return cols.gather(1, order), score.gather(1, order)


def similarity_topk(q: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, scores (N, k) float64), exactly reference.similarity_topk's."""
    if not ieee_fp32_gemms(q.device):  # TF32 / bf16 GEMMs allowed: the filter's float32 bound does not hold
        return reference.similarity_topk(q, keys, k, metric)
    n, m = q.shape[0], keys.shape[0]
    index = torch.empty(n, k, dtype=torch.int64, device=q.device)
    score = torch.empty(n, k, dtype=torch.float64, device=q.device)
    k32, squares, key_max = _filter_keys(keys, metric)
    step = max(1, CHUNK_ELEMENTS // max(1, m))
    for r0 in range(0, n, step):
        rows = q[r0:r0 + step]
        s, eps = _filter(rows, k32, squares, key_max, metric)
        row, col = _candidates(s, eps, k)
        index[r0:r0 + step], score[r0:r0 + step] = exact_among(rows, keys, row, col, k, metric)
    return index, score
