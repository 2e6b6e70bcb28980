"""Exact codebook lookup as a composition of PyTorch's own kernels: impl="torch", the CPU fast path.

A float32 GEMM scan (torch.addmm / mm on chunks of rows, then two row minima) gives each row's best
score, its index and the second-best score; certify.py's bound on the scan's error keeps the rows
whose gap proves the pick, and re-scores the others exactly (reference.exact_indices, float64).
bf16 / fp16 inputs are upcast to float32 (their products are then exact); bf16 ones take oneDNN's
bf16 GEMM mode (exact products, float32 accumulation: clip_loss.torch_impl.bf16_valued_fp32_gemms). Extra memory: one
(rows x K) float32 chunk of CHUNK_ELEMENTS plus O((N + K) D).

Shapes: z (N, D), e (K, D) -> indices (N,) int64, distances (N,) float32.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..clip_loss.torch_impl import bf16_valued_fp32_gemms
from . import certify, reference

# Elements of one score chunk (16 MiB at float32); tests shrink it to force several chunks.
CHUNK_ELEMENTS = 1 << 22


def dot_error(d: int) -> float:
    """c for a float32 GEMM over D features: the recursive-summation bound (D + 1) 2^-24, blocked or
    fused in any order, taken four times over as certify.py's 16-bit model does."""
    return (d + 32) * 2.0 ** -22


def _scan(z: Tensor, e: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """best (N,) fp32, second (N,) fp32 (inf when K = 1), index (N,) of s = alpha_j <z_i, e_j> + beta_j."""
    n, k = z.shape[0], e.shape[0]
    # l2: alpha = -2 folds into the codebook exactly and beta into the GEMM (addmm: one rounding,
    # as certify.py assumes); cosine: the GEMM, then one rounded multiply by alpha.
    l2 = bool((alpha == -2).all())
    e32 = e.float() * -2 if l2 else e.float()
    best = torch.empty(n, dtype=torch.float32, device=z.device)
    second = torch.full((n,), float("inf"), dtype=torch.float32, device=z.device)
    index = torch.empty(n, dtype=torch.int64, device=z.device)
    step = max(1, CHUNK_ELEMENTS // max(1, k))
    buf = torch.empty(min(step, n), k, dtype=torch.float32, device=z.device)
    for r0 in range(0, n, step):
        c = min(step, n - r0)
        zc = z[r0:r0 + c].float()
        if z.dtype == torch.bfloat16:
            with bf16_valued_fp32_gemms(True):  # exact products, float32 sums, float32 result
                scores = torch.mm(zc, e32.T, out=buf[:c])
            # beta added outside the bf16-mode GEMM, so it is never rounded to bf16
            scores.add_(beta) if l2 else scores.mul_(alpha)
        elif l2:
            scores = torch.addmm(beta, zc, e32.T, out=buf[:c])
        else:
            scores = torch.mm(zc, e32.T, out=buf[:c]).mul_(alpha)
        rows = slice(r0, r0 + c)
        best[rows], index[rows] = scores.min(dim=1)
        if k > 1:
            # Second best: the minimum once the best is masked. Equal scores leave a zero gap, so
            # such rows are never certified and the exact re-score picks the lowest index.
            scores.scatter_(1, index[rows, None], float("inf"))
            second[rows] = scores.amin(dim=1)
    return best, second, index


def _column_major(x: Tensor) -> Tensor:
    """x (R, D) float64 laid out feature-major, so the definition's per-feature slices are contiguous."""
    return x.double().T.contiguous().T


def chosen_distances(z: Tensor, e: Tensor, index: Tensor, metric: str) -> Tensor:
    """float32 distances (N,) by the definition: reference.spec_distances on feature-major copies
    (the same elementwise operations in the same order, so the same bits, with contiguous slices)."""
    return reference.spec_distances(_column_major(z), _column_major(e[index]), metric).float()


def lookup(z: Tensor, e: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N,) int64, distances (N,) float32), exactly the definition's argmin (reference.py)."""
    if z.dtype == torch.float64 or torch.get_float32_matmul_precision() != "highest":
        # float64 inputs, or float32 GEMMs allowed to drop precision (bf16 / tf32): no float32 bound holds.
        return reference.lookup(z, e, metric)
    index, dist, _ = certify.lookup(z, e, metric, _scan, chosen_distances, dot_error(z.shape[1]))
    return index, dist
