"""Linear + cross-entropy in plain PyTorch: the specification, and the bounded-memory CPU path.

Notation shared by every implementation of this op:
  hidden (N, H), weight (V, H), optional bias (V,), targets (N,) in [0, V) or ignore_index.
  z = hidden @ weight.T + bias, accumulated in float32 (float64 for float64 inputs);
  with logit_softcap c: z <- c * tanh(z / c) (Gemma 2's final-logit capping).
  lse_i = logsumexp_j z_ij
  loss_i = (1 - eps) * (lse_i - z_(i, t_i)) + eps * (lse_i - mean_j z_ij)    (F.cross_entropy's smoothing)
           + z_loss * lse_i ** 2                                              (PaLM's z-loss)
  and 0 for rows whose target is ignore_index.
  reduction "mean" divides the sum by the number of rows not ignored (NaN when there are none, as
  PyTorch), "sum" sums, "none" returns loss (N,).
Gradient of loss_i with respect to z_ij (before the softcap's chain factor 1 - (z / c)^2), evaluated
term by term so that no part cancels against another:
  (1 - eps) * (p_ij - [j == t_i]) + eps * (p_ij - 1 / V) + 2 * z_loss * lse_i * p_ij,  p = softmax(z).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Elements of one logits chunk on the CPU path (64 MiB at float32).
CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_cross_entropy_dense(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                               ignore_index: int, label_smoothing: float, softcap: float,
                               z_loss: float) -> Tensor:
    """The specification: per-row losses (N,) from the full N x V logits, differentiable by autograd."""
    ct = compute_dtype(hidden.dtype)
    z = hidden.to(ct) @ weight.to(ct).T
    if bias is not None:
        z = z + bias.to(ct)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    if z_loss:
        kept = (targets != ignore_index).to(ct)
        loss = loss + z_loss * torch.logsumexp(z, dim=1) ** 2 * kept
    return loss


def reduce(rows: Tensor, targets: Tensor, ignore_index: int, reduction: str) -> Tensor:
    """Apply the reduction to per-row losses (ignored rows hold 0)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum()  # 0 / 0 = NaN when every row is ignored, as PyTorch


def row_weights(targets: Tensor, ignore_index: int, reduction: str, dtype=torch.float32) -> Tensor:
    """d(reduced loss) / d(loss_i) for mean / sum: 1 or 1 / count, and 0 on ignored rows."""
    kept = (targets != ignore_index).to(dtype)
    if reduction == "mean":
        kept = kept / kept.sum().clamp(min=1)
    return kept


def _chunk_rows(v: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(v, 1))


def _row_stats(z: Tensor, targets: Tensor, ignore_index: int, label_smoothing: float, z_loss: float):
    """(lse (C,), loss (C,)) for one chunk of capped logits z (C, V)."""
    lse = torch.logsumexp(z, dim=1)
    kept = targets != ignore_index
    z_t = z.gather(1, torch.where(kept, targets, 0)[:, None])[:, 0]
    loss = (1 - label_smoothing) * (lse - z_t)
    if label_smoothing:
        loss = loss + label_smoothing * (lse - z.mean(dim=1))
    if z_loss:
        loss = loss + z_loss * lse ** 2
    return lse, torch.where(kept, loss, torch.zeros_like(loss))


def _logit_grad(z: Tensor, raw: Tensor, lse: Tensor, targets: Tensor, w: Tensor, ignore_index: int,
                label_smoothing: float, softcap: float, z_loss: float) -> Tensor:
    """w_i * dloss_i / draw_ij for one chunk: z capped logits, raw before the cap."""
    v = z.shape[1]
    p = torch.exp(z - lse[:, None])
    kept = targets != ignore_index
    one_hot = torch.zeros_like(p)
    one_hot[kept.nonzero()[:, 0], targets[kept]] = 1
    # term by term, as autograd would: the CE part is exactly 0 where p is one-hot
    g = (1 - label_smoothing) * (p - one_hot) + label_smoothing * (p - 1 / v) + (2 * z_loss) * lse[:, None] * p
    if softcap:
        g = g * (1 - torch.tanh(raw / softcap) ** 2)
    return g * w[:, None]


def _capped_logits(h: Tensor, wt: Tensor, bias: Optional[Tensor], softcap: float):
    raw = h @ wt.T
    if bias is not None:
        raw = raw + bias
    return (softcap * torch.tanh(raw / softcap) if softcap else raw), raw


def forward_chunked(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], ignore_index: int,
                    label_smoothing: float, softcap: float, z_loss: float, reduction: str,
                    need: tuple[bool, bool, bool]):
    """(loss, lse (N,), d_hidden, d_weight, d_bias): for mean / sum with `need` flags set, the
    gradients of the reduced loss come out of the same pass over the logits (empty otherwise)."""
    ct = compute_dtype(hidden.dtype)
    n, h = hidden.shape
    v = weight.shape[0]
    wt = weight.to(ct)
    b = bias.to(ct) if bias is not None else None
    eager = reduction != "none" and any(need)
    w_rows = row_weights(targets, ignore_index, reduction, ct) if eager else None
    lse = torch.empty(n, dtype=ct, device=hidden.device)
    rows = torch.empty(n, dtype=ct, device=hidden.device)
    dh = torch.empty(n if eager and need[0] else 0, h, dtype=ct, device=hidden.device)
    dw = torch.zeros(v if eager and need[1] else 0, h, dtype=ct, device=hidden.device)
    db = torch.zeros(v if eager and need[2] else 0, dtype=ct, device=hidden.device)
    for r0 in range(0, n, _chunk_rows(v)):
        r1 = min(n, r0 + _chunk_rows(v))
        hc = hidden[r0:r1].to(ct)
        z, raw = _capped_logits(hc, wt, b, softcap)
        lse[r0:r1], rows[r0:r1] = _row_stats(z, targets[r0:r1], ignore_index, label_smoothing, z_loss)
        if eager:
            g = _logit_grad(z, raw, lse[r0:r1], targets[r0:r1], w_rows[r0:r1], ignore_index, label_smoothing,
                            softcap, z_loss)
            _accumulate(g, hc, wt, r0, r1, dh, dw, db, need)
    loss = reduce(rows, targets, ignore_index, reduction)
    return loss, lse, dh.to(hidden.dtype), dw.to(weight.dtype), db.to(weight.dtype)


def _accumulate(g, hc, wt, r0, r1, dh, dw, db, need):
    if need[0]:
        dh[r0:r1] = g @ wt
    if need[1]:
        dw += g.T @ hc
    if need[2]:
        db += g.sum(dim=0)


def backward_chunked(grad_rows: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                     lse: Tensor, ignore_index: int, label_smoothing: float, softcap: float, z_loss: float,
                     need: tuple[bool, bool, bool]):
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows_i * loss_i (reduction "none"), recomputing logits."""
    ct = compute_dtype(hidden.dtype)
    n, h = hidden.shape
    v = weight.shape[0]
    wt = weight.to(ct)
    b = bias.to(ct) if bias is not None else None
    dh = torch.empty(n if need[0] else 0, h, dtype=ct, device=hidden.device)
    dw = torch.zeros(v if need[1] else 0, h, dtype=ct, device=hidden.device)
    db = torch.zeros(v if need[2] else 0, dtype=ct, device=hidden.device)
    w_rows = grad_rows.to(ct) * (targets != ignore_index).to(ct)
    for r0 in range(0, n, _chunk_rows(v)):
        r1 = min(n, r0 + _chunk_rows(v))
        hc = hidden[r0:r1].to(ct)
        z, raw = _capped_logits(hc, wt, b, softcap)
        g = _logit_grad(z, raw, lse[r0:r1].to(ct), targets[r0:r1], w_rows[r0:r1], ignore_index, label_smoothing,
                        softcap, z_loss)
        _accumulate(g, hc, wt, r0, r1, dh, dw, db, need)
    return dh.to(hidden.dtype), dw.to(weight.dtype), db.to(weight.dtype)
