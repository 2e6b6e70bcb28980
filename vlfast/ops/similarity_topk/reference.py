"""Exact top-k similarity search in plain PyTorch: the specification.

For queries q (N, D) and keys (M, D), in float64 on the values given, each sum taken in order d = 0 .. D-1
(vlfast.ops.codebook_lookup.reference.ordered_row_sums), so every device gets the same bits:
  metric="ip":     score_ij = sum_d q_id k_jd
  metric="cosine": score_ij = ip_ij / (|q_i| |k_j|)   (0 where either norm is 0)
  metric="l2":     score_ij = -sum_d (q_id - k_jd)^2   (larger is nearer)
indices_i: the k keys of largest score, in decreasing score, ties to the lower index; scores_i theirs
(float64 here; the public op returns them as float32). Memory: one block of (rows x M x D) float64 values at a time; time O(N M D) elementwise.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..codebook_lookup.reference import ordered_row_sums

METRICS = ("ip", "cosine", "l2")
CHUNK_ELEMENTS = 1 << 23  # float64 elements per block (64 MiB)


def pair_scores(q: Tensor, keys: Tensor, metric: str) -> Tensor:
    """(P,) float64 scores of the pairs (q_p, k_p), q and keys (P, D)."""
    q, keys = q.double(), keys.double()
    if metric == "l2":
        return -ordered_row_sums((q - keys) ** 2)
    dot = ordered_row_sums(q * keys)
    if metric == "ip":
        return dot
    return cosine_of_sums(dot, ordered_row_sums(q * q), ordered_row_sums(keys * keys))


def cosine_of_sums(dot: Tensor, qq: Tensor, kk: Tensor) -> Tensor:
    """The cosine from the ordered sums <q, k>, |q|^2, |k|^2 (float64, any shape): one function for every
    path, because sqrt's last bit is the device library's (PyTorch's CPU sqrt is not always correctly
    rounded), so the paths agree only through the same PyTorch ops."""
    norms = qq.sqrt() * kk.sqrt()
    return torch.where(norms > 0, dot / torch.where(norms > 0, norms, 1.0), 0.0)


def top_k_lowest_index(s: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest of each row of s (R, M), decreasing, ties to the lower column: (values, indices)."""
    order = torch.sort(-s, dim=1, stable=True).indices[:, :k]  # stable: equal scores keep column order
    return s.gather(1, order), order


def similarity_topk(q: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, scores (N, k) float64) by the definition (the public op rounds the scores
    to float32)."""
    n, d = q.shape
    m = keys.shape[0]
    index = torch.empty(n, k, dtype=torch.int64, device=q.device)
    score = torch.empty(n, k, dtype=torch.float64, device=q.device)
    step = max(1, CHUNK_ELEMENTS // max(1, m * d))
    for r0 in range(0, n, step):
        rows = q[r0:r0 + step]
        pairs_q = rows[:, None, :].expand(-1, m, -1).reshape(-1, d)
        pairs_k = keys[None].expand(rows.shape[0], -1, -1).reshape(-1, d)
        values, order = top_k_lowest_index(pair_scores(pairs_q, pairs_k, metric).view(rows.shape[0], m), k)
        index[r0:r0 + step], score[r0:r0 + step] = order, values
    return index, score
