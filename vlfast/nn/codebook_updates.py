"""Codebook statistics and updates for vlfast.nn.VectorQuantizer, without one-hot matrices.

Every function that changes a codebook takes part in the same collectives on every rank of `group`
(a torch.distributed process group; None is the default one) when it has more than one process:
counts and sums are all-reduced, and random choices are made on the group's first rank and
broadcast, so every rank ends with the same codebook.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..ops.codebook_lookup import codebook_lookup


LOCAL = object()  # a `group` that means this process alone: no collectives


def distributed(group=None) -> bool:
    if group is LOCAL:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_(*tensors: Tensor, group=None) -> None:
    """Sum each tensor over the group's ranks, in place (nothing outside a multi-process group)."""
    if distributed(group):
        for t in tensors:
            dist.all_reduce(t, group=group)


def from_first_rank_(t: Tensor, group=None) -> Tensor:
    """The group's first rank's values of t on every rank (in place; t itself when not distributed)."""
    if distributed(group):
        dist.broadcast(t, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return t


def statistics_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def code_counts(index: Tensor, num_codes: int, dtype: torch.dtype) -> Tensor:
    """How many rows picked each code: (K,) in `dtype`."""
    return torch.bincount(index, minlength=num_codes).to(dtype)


def code_sums(x: Tensor, index: Tensor, num_codes: int) -> Tensor:
    """Sum of the rows of x (M, D) that picked each code: (K, D), float32 (float64 for float64 x)."""
    dtype = statistics_dtype(x)
    return torch.zeros(num_codes, x.shape[1], dtype=dtype, device=x.device).index_add_(0, index, x.to(dtype))


def usage_statistics(counts: Tensor) -> tuple[Tensor, Tensor]:
    """(perplexity, fraction of codes used) of one batch's code counts (K,)."""
    p = counts / counts.sum().clamp(min=1)
    entropy = -torch.where(p > 0, p * p.clamp(min=1e-30).log(), 0.0).sum()
    return entropy.exp(), (counts > 0).to(counts.dtype).mean()


def sample_rows(x: Tensor, count: int, group=None) -> Tensor:
    """`count` rows of x (M, D) drawn uniformly with replacement on the group's first rank, the same on
    every rank."""
    picks = x[torch.randint(0, x.shape[0], (count,), device=x.device)]
    return from_first_rank_(picks.contiguous(), group)


def ema_update_(codebook: Tensor, cluster_size: Tensor, embed_avg: Tensor, counts: Tensor, sums: Tensor,
                decay: float, eps: float, normalize: bool) -> None:
    """EMA of the (already all-reduced) counts and sums; codebook = embed_avg / Laplace-smoothed sizes.

    Smoothing keeps every size positive, so a code nobody picked keeps a finite vector:
    size_j <- (size_j + eps) / (n + K eps) * n with n the total size.
    """
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    embed_avg.mul_(decay).add_(sums.to(embed_avg.dtype), alpha=1 - decay)
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + cluster_size.numel() * eps) * n
    new = embed_avg / smoothed[:, None]
    codebook.copy_(F.normalize(new, dim=-1) if normalize else new)


def restart_dead_codes_(codebook: Tensor, cluster_size: Tensor, embed_avg: Optional[Tensor], x: Tensor,
                        threshold: float, normalize: bool, group=None) -> int:
    """Codes whose EMA size is below `threshold` restart at random rows of x (M, D); their size becomes
    `threshold` (and their EMA sum that times the new vector). Returns how many restarted."""
    dead = cluster_size < threshold
    n_dead = int(dead.sum())  # the same on every rank: cluster_size is built from all-reduced counts
    if n_dead == 0:
        return 0
    vectors = sample_rows(x.to(codebook.dtype), n_dead, group)
    if normalize:
        vectors = F.normalize(vectors, dim=-1)
    codebook[dead] = vectors
    cluster_size[dead] = threshold
    if embed_avg is not None:
        embed_avg[dead] = vectors.to(embed_avg.dtype) * threshold
    return n_dead


def kmeans(x: Tensor, num_codes: int, iters: int, metric: str, impl: str = "auto", group=None) -> Tensor:
    """Lloyd's k-means on x (M, D) (every rank's rows when distributed): centroids (K, D) in x's dtype.

    Starts from rows drawn on the group's first rank; each iteration assigns rows by vlfast.codebook_lookup and moves
    every centroid that got rows to their (all-reduced) mean; a centroid with none stays. For
    metric="cosine", centroids are normalised means (spherical k-means).
    """
    centroids = sample_rows(x, num_codes, group)
    if metric == "cosine":
        centroids = F.normalize(centroids, dim=-1)
    for _ in range(iters):
        index, _ = codebook_lookup(x, centroids, metric=metric, impl=impl)
        counts, sums = code_counts(index, num_codes, statistics_dtype(x)), code_sums(x, index, num_codes)
        all_reduce_(counts, sums, group=group)
        means = (sums / counts.clamp(min=1)[:, None]).to(x.dtype)
        if metric == "cosine":
            means = F.normalize(means, dim=-1)
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    return centroids
