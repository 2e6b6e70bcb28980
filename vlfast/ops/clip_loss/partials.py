"""Host-side work shared by the Triton and CUDA kernels of the contrastive loss.

Both kernel sets write the same partial results (see triton.py's docstring); this module sizes their
grids, combines the partials into the (N,) losses and (3, N) stats that reference.py defines, and
runs the backward's row chunks: a kernel writes G = scale * dLoss/dz for the chunk, then two GEMMs
(cuBLAS through torch) give d_a = G @ b and accumulate d_b += G^T @ a in float32. Only the kernel
launches differ between the two paths; they come in as callables.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..._backends import sm_count

from ... import _env, _scratch
from ..._gemm import addmm_f32_
from .reference import softplus

# Bytes of the backward's G chunk (C x M in the input dtype): about the size of the features
# ((N + M) * D), so extra memory stays O((N + M) * D), within [64, 384] MiB for GEMM efficiency.
# VLFAST_CLIP_CHUNK_BYTES overrides it.
GRAD_CHUNK_BYTES = _env.positive_int("VLFAST_CLIP_CHUNK_BYTES", None)


def cdiv(x: int, y: int) -> int:
    return -(-x // y)


def grad_chunk_rows(n: int, m: int, d: int, element_size: int, budget: Optional[int] = None) -> int:
    """Rows per backward chunk: a multiple of 128 (or all n), G about `budget` bytes."""
    budget = budget or min(384 << 20, max(64 << 20, (n + m) * d * element_size))
    rows = max(128, budget // max(1, m * element_size) // 128 * 128)
    return min(rows, n)


def column_splits(row_blocks: int, m: int, device: torch.device, col_multiple: int) -> tuple[int, int]:
    """(splits, columns per split) so that the stats grid fills the GPU about four times over.

    Splits are multiples of col_multiple columns (the widest column tile), so tiles never straddle them.
    """
    sms = sm_count(device)
    want = cdiv(4 * sms, row_blocks)
    splits = max(1, min(want, cdiv(m, col_multiple)))
    cols_per_split = cdiv(cdiv(m, splits), col_multiple) * col_multiple
    return cdiv(m, cols_per_split), cols_per_split


def forward_partials(n: int, m: int, row_blocks: int, splits: int, symmetric: bool, device: torch.device):
    """stats (3, N) zeros, row partials (splits, N) and column partials (row blocks, M) or None."""
    stats = torch.zeros(3, n, dtype=torch.float32, device=device)
    row_part = _scratch.empty(splits, n, dtype=torch.float32, device=device)
    col_part = _scratch.empty(row_blocks, m, dtype=torch.float32, device=device) if symmetric else None
    return stats, row_part, col_part


def combine_forward(stats: Tensor, row_part: Tensor, col_part: Optional[Tensor], kind: str,
                    symmetric: bool) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and stats (3, N) from the stats kernel's partials (stats[0] already holds
    the logits at the positives for softmax)."""
    if kind == "sigmoid":
        stats[1] = row_part.sum(dim=0)
        return stats[1].clone(), stats
    stats[1] = softplus(torch.logsumexp(row_part, dim=0))
    if not symmetric:
        return stats[1].clone(), stats
    stats[2] = softplus(torch.logsumexp(col_part, dim=0))
    return (stats[1] + stats[2]) / 2, stats


# launch(r0, c, g, w, em, ds_part, db_part): the kernel for rows [r0, r0 + c), writing G into g
# (a (c, M) view) and its partial sums into the chunk's rows of ds_part / db_part.
GradLaunch = Callable[[int, int, Tensor, Tensor, Tensor, Tensor, Tensor], None]


def backward(grad: Tensor, a: Tensor, b: Tensor, stats: Tensor, symmetric: bool, need_a: bool, need_b: bool,
             chunk: int, parts_per_chunk: int, launch: GradLaunch, g_row_elems: Optional[int] = None):
    """(d_a, d_b, d_scale, d_bias) of sum_i grad_i * loss_i, one chunk of rows at a time.

    parts_per_chunk: the most programs a chunk's launch uses (length of its partial sums).
    g_row_elems: row stride of the G buffer in elements (default M; the CUDA kernels want rows
    padded to 16 bytes).
    """
    n, d = a.shape
    m = b.shape[0]
    w = grad.float() * (0.5 if symmetric else 1.0)
    em = torch.expm1(-stats[1:3]).contiguous()  # (2, N): softmax - 1 at each row's / column's positive
    g_buf = _scratch.empty(chunk, g_row_elems or m, dtype=a.dtype, device=a.device)
    if g_buf.device.type == "cpu" and g_buf.shape[1] > m:
        # No kernel writes the padding past column M, but CPU BLAS's bfloat16 GEMM reads a row of A
        # on past K (up to a multiple of 32) and multiplies it by zero: a NaN there (poisoned or
        # leftover scratch) made whole rows of d_a NaN. cuBLAS reads only K columns: the GPU skips this.
        g_buf[:, m:].zero_()
    n_chunks = cdiv(n, chunk)
    ds_part = torch.zeros(n_chunks, parts_per_chunk, dtype=torch.float32, device=a.device)
    db_part = torch.zeros_like(ds_part)
    da = _scratch.empty(n if need_a else 0, d, dtype=a.dtype, device=a.device)
    db_acc = torch.zeros(m, d, dtype=torch.float32, device=a.device) if need_b else None
    for i, r0 in enumerate(range(0, n, chunk)):
        c = min(chunk, n - r0)
        g = g_buf[:c, :m]
        launch(r0, c, g, w, em, ds_part[i], db_part[i])
        if need_a:
            torch.mm(g, b, out=da[r0:r0 + c])
        if need_b:
            addmm_f32_(db_acc, g.T, a[r0:r0 + c])
    db = db_acc.to(b.dtype) if need_b else b.new_empty(0, d)
    return da, db, ds_part.sum(), db_part.sum()
