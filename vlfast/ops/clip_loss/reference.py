"""Contrastive loss in plain PyTorch: the specification, and the bounded-memory CPU path.

Notation shared by every implementation of this op:
  a (N, D) row features (images), b (M, D) column features (texts), s the scale (already
  exponentiated), bias an optional scalar; logits z_ij = s * <a_i, b_j> + bias.
  Positives sit at (i, i + offset); offset = -1 means there are none (SigLIP's negative-only blocks).

  softmax: row_i = logsumexp_j z_ij - z_(i, i+offset)  (image -> text cross-entropy)
           col_j = logsumexp_i z_ij - z_jj              (text -> image; symmetric, N == M only)
           loss_i = (row_i + col_i) / 2 if symmetric else row_i
  sigmoid: loss_i = sum_j softplus(-t_ij z_ij), t = +1 at the positive and -1 elsewhere
           (= -sum_j log sigmoid(t_ij z_ij), SigLIP's loss before dividing by N)

Every implementation returns the per-row losses (N,) and a (3, N) stats tensor for the backward:
[z at the positive, row loss, column loss] (zeros where unused).

The chunked path works in "margin" form, t_ij = z_ij - z_positive, which keeps losses near 1e-11
exact (loss = softplus(logsumexp over negatives of t)) and gives the positive's gradient as
expm1(-loss) instead of softmax - 1, which cancels to zero in float32.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one logits chunk; bounds the CPU path's extra memory (64 MiB at float32).
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) without overflow and without losing tiny values."""
    return torch.where(x > 0, x + torch.log1p(torch.exp(-x)), torch.log1p(torch.exp(x)))


def positive_mask(n: int, m: int, offset: int, device) -> Tensor:
    """(n, m) bool, True at (i, i + offset)."""
    mask = torch.zeros(n, m, dtype=torch.bool, device=device)
    if offset >= 0:
        rows = torch.arange(n, device=device)
        mask[rows, rows + offset] = True
    return mask


def clip_loss_dense(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str,
                    symmetric: bool, offset: int) -> Tensor:
    """The specification: per-row losses (N,) from the full N x M logits, differentiable by autograd."""
    ct = compute_dtype(a.dtype)
    logits = scale.to(ct) * (a.to(ct) @ b.to(ct).T)
    if bias is not None:
        logits = logits + bias.to(ct)
    n, m = logits.shape
    if kind == "softmax":
        rows = torch.arange(n, device=a.device)
        loss = F.cross_entropy(logits, rows + offset, reduction="none")
        if symmetric:
            loss = (loss + F.cross_entropy(logits.T, rows, reduction="none")) / 2
        return loss
    sign = positive_mask(n, m, offset, a.device).to(ct) * 2 - 1
    return softplus(-sign * logits).sum(dim=1)


def _chunk_rows(m: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(m, 1))


def _positive_logits(a: Tensor, b: Tensor, s: Tensor, bias: Optional[Tensor], offset: int, ct) -> Tensor:
    """z at each row's positive, (N,), computed in row chunks."""
    n = a.shape[0]
    pos = torch.empty(n, dtype=ct, device=a.device)
    step = _chunk_rows(a.shape[1])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        pos[r0:r1] = (a[r0:r1].to(ct) * b[r0 + offset:r1 + offset].to(ct)).sum(dim=1)
    pos = s * pos
    return pos + bias if bias is not None else pos


def forward_chunked(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str,
                    symmetric: bool, offset: int) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and stats (3, N); extra memory one chunk of logits plus O(N + M)."""
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    bias_c = bias.to(ct) if bias is not None else None
    bt = b.to(ct)
    stats = torch.zeros(3, n, dtype=ct, device=a.device)
    step = _chunk_rows(m)
    if kind == "softmax":
        pos = _positive_logits(a, b, s, bias_c, offset, ct)
        stats[0] = pos
        col_nlse = torch.full((m,), float("-inf"), dtype=ct, device=a.device) if symmetric else None
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            z = s * (a[r0:r1].to(ct) @ bt.T)
            if bias_c is not None:
                z = z + bias_c
            is_pos = positive_mask(r1 - r0, m, r0 + offset, a.device)
            margin = (z - pos[r0:r1, None]).masked_fill(is_pos, float("-inf"))
            stats[1, r0:r1] = softplus(torch.logsumexp(margin, dim=1))
            if symmetric:
                margin = (z - pos[None, :]).masked_fill(is_pos, float("-inf"))
                col_nlse = torch.logaddexp(col_nlse, torch.logsumexp(margin, dim=0))
        loss = stats[1]
        if symmetric:
            stats[2] = softplus(col_nlse)
            loss = (stats[1] + stats[2]) / 2
        return loss.clone(), stats
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        z = s * (a[r0:r1].to(ct) @ bt.T)
        if bias_c is not None:
            z = z + bias_c
        sign = positive_mask(r1 - r0, m, r0 + offset if offset >= 0 else -1, a.device).to(ct) * 2 - 1
        stats[1, r0:r1] = softplus(-sign * z).sum(dim=1)
    return stats[1].clone(), stats


def logit_grad_chunk(z: Tensor, r0: int, grad: Tensor, stats: Tensor, kind: str, symmetric: bool,
                     offset: int) -> Tensor:
    """dLoss/dz for rows [r0, r0 + len(z)) given dLoss/dloss_i = grad (N,); shape of z."""
    c, m = z.shape
    rows = slice(r0, r0 + c)
    ct = z.dtype
    if kind == "softmax":
        pos, row_loss, col_loss = stats[0].to(ct), stats[1].to(ct), stats[2].to(ct)
        w = grad.to(ct) / 2 if symmetric else grad.to(ct)
        is_pos = positive_mask(c, m, r0 + offset, z.device)
        p = torch.exp(z - pos[rows, None] - row_loss[rows, None])
        p = torch.where(is_pos, torch.expm1(-row_loss[rows])[:, None], p)
        g = w[rows, None] * p
        if symmetric:
            q = torch.exp(z - pos[None, :] - col_loss[None, :])
            q = torch.where(is_pos, torch.expm1(-col_loss)[None, :], q)
            g = g + w[None, :] * q
        return g
    sign = positive_mask(c, m, r0 + offset if offset >= 0 else -1, z.device).to(ct) * 2 - 1
    return grad[rows, None].to(ct) * (-sign) * torch.sigmoid(-sign * z)


def backward_chunked(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor],
                     stats: Tensor, kind: str, symmetric: bool, offset: int,
                     need_a: bool = True, need_b: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (d_a, d_b, d_scale, d_bias) of sum_i grad_i * loss_i; d_a/d_b are empty when not needed."""
    ct = compute_dtype(a.dtype)
    n, m = a.shape[0], b.shape[0]
    s = scale.to(ct)
    bias_c = bias.to(ct) if bias is not None else None
    bt = b.to(ct)
    da = torch.empty(n if need_a else 0, a.shape[1], dtype=ct, device=a.device)
    db = torch.zeros(m if need_b else 0, b.shape[1], dtype=ct, device=a.device)
    dscale = torch.zeros((), dtype=ct, device=a.device)
    dbias = torch.zeros((), dtype=ct, device=a.device)
    for r0 in range(0, n, _chunk_rows(m)):
        r1 = min(n, r0 + _chunk_rows(m))
        at = a[r0:r1].to(ct)
        dot = at @ bt.T
        z = s * dot + bias_c if bias_c is not None else s * dot
        g = logit_grad_chunk(z, r0, grad, stats, kind, symmetric, offset)
        dscale += (g * dot).sum()
        if kind == "sigmoid":  # softmax logits are shift-invariant: d_bias is exactly 0
            dbias += g.sum()
        if need_a:
            da[r0:r1] = s * (g @ bt)
        if need_b:
            db += s * (g.T @ at)
    return da.to(a.dtype), db.to(b.dtype), dscale, dbias
