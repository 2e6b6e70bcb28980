"""Exact top-k from PyTorch's own kernels: a float32 GEMM filter, certified, then float64 re-scoring.

Per block of query rows: float32 scores by one GEMM (cosine: of the rows normalised in float64 first;
l2: 2 <q, k> - |k|^2, the row constant |q|^2 dropped), the k-th largest per row, and every key within
2 eps_i of it as a candidate. eps_i bounds the float32 score's error: (4 D + 16) 2^-24 (|q_i| + max |k|)^2,
four times the recursive-summation bound of the products and norms (the normalised rows, |.| = 1, for
cosine). A key of the true top k scores at least the true k-th score, so its float32 score is within
eps of that and the float32 k-th score within eps too: it is a candidate. The candidates (almost always
little more than k per row) are scored by the definition (reference.pair_scores, the same bits) and the
exact top k chosen among them, ties to the lower index. Memory: one (rows x M) float32 block and its mask.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference

CHUNK_ELEMENTS = 1 << 22  # float32 scores per block (16 MiB)


def _filter(q: Tensor, keys: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """(float32 scores (R, M), eps (R,) float64): the filter's scores and their error bound."""
    q64, k64 = q.double(), keys.double()
    if metric == "cosine":
        q64 = q64 / q64.norm(dim=1, keepdim=True).clamp_min(1e-300)
        k64 = k64 / k64.norm(dim=1, keepdim=True).clamp_min(1e-300)
    q32, k32 = q64.float(), k64.float()
    s = q32 @ k32.T
    if metric == "l2":
        s = s.mul_(2).sub_((k32 * k32).sum(1))
    size = q64.norm(dim=1) + k64.norm(dim=1).max()
    eps = (4 * q.shape[1] + 16) * 2.0 ** -24 * size ** 2
    return s, eps


def _exact_among(q: Tensor, keys: Tensor, candidates: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """Top k of each row among its candidate columns (R, M) bool, by the definition."""
    row, col = candidates.nonzero(as_tuple=True)  # row-major: columns ascend within a row
    score = reference.pair_scores(q[row], keys[col], metric)
    # order: by row, then score descending, then column (stable sorts, last key first)
    order = torch.sort(-score, stable=True).indices
    order = order[torch.sort(row[order], stable=True).indices]
    counts = candidates.sum(dim=1)
    starts = torch.cumsum(counts, 0) - counts
    pick = order[(starts[:, None] + torch.arange(k, device=q.device)).reshape(-1)]
    return col[pick].view(-1, k), score[pick].view(-1, k)


def similarity_topk(q: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, scores (N, k) float32), exactly reference.similarity_topk's."""
    n, m = q.shape[0], keys.shape[0]
    index = torch.empty(n, k, dtype=torch.int64, device=q.device)
    score = torch.empty(n, k, dtype=torch.float32, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(1, m))
    for r0 in range(0, n, step):
        rows = q[r0:r0 + step]
        s, eps = _filter(rows, keys, metric)
        kth = s.topk(k, dim=1).values[:, -1].double()
        # the threshold rounded down to float32 (never above the exact one), compared in float32
        threshold = (kth - 2 * eps).float()
        threshold = torch.nextafter(threshold, torch.full_like(threshold, -float("inf")))
        candidates = s >= threshold[:, None]
        candidates |= ~torch.isfinite(threshold)[:, None]  # overflowed scores: every key is a candidate
        index[r0:r0 + step], values = _exact_among(rows, keys, candidates, k, metric)
        score[r0:r0 + step] = values.float()
    return index, score
