"""Cases and checks for similarity_topk's candidate filter (a kernel's `emit`, filter.Emit's contract),
shared by the emulated CUDA kernel (tests/test_cuda_emulation.py) and the GPU tests.

The kernel's fp32 scores are not known bit for bit, so the checks hold it to the codebook scan's error
model: with eps_ij = certify.dot_error(dtype, D) |q_i| |alpha_j| |k_j| + the fma's rounding (and the
float64 definition's own error), every pair whose float64 score is >= threshold_i + eps_ij must be
emitted (while the row has room), none below threshold_i - eps_ij may be, emitted scores are within
eps_ij of float64 and (the kernel's own comparison) >= threshold_i in fp32, count_i lies between the
pairs that must and those that may qualify, and an overflowing row (count_i > capacity) fills its
capacity with distinct qualifying keys.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from vlfast.ops.codebook_lookup import certify

CHECK_ROWS = 256  # rows of float64 scores checked at a time (the GPU case has 100000 keys)

# Per row (cycled): the fraction of keys at or above the threshold; 0 is just above the best score
# (nothing qualifies), None is -inf (everything does).
FRACTIONS = (0.01, 0.1, 0.5, None, 1e-9, 0.0, 0.03)


def random_case(n: int, m: int, d: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> tuple:
    """(q (n, d), keys (m, d) in dtype, alpha, beta (m,) float32): alpha of both signs, |alpha| in
    [0.25, 2], beta of the dot products' size."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g).to(dtype)
    keys = torch.randn(m, d, generator=g).to(dtype)
    sign = torch.where(torch.rand(m, generator=g) < 0.8, 1.0, -1.0)
    alpha = sign * (0.25 + 1.75 * torch.rand(m, generator=g))
    beta = 0.5 * math.sqrt(d) * torch.randn(m, generator=g)
    return tuple(x.to(device) for x in (q, keys, alpha, beta))


def scores64(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """(R, M) float64: alpha_j <q_i, k_j> + beta_j."""
    return alpha.double()[None] * (q.double() @ keys.double().T) + beta.double()[None]


def errors(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """(R, M) float64 eps_ij: the kernel's score error (codebook certify's model), with headroom."""
    d = q.shape[1]
    c = certify.dot_error(q.dtype, d)
    size = q.double().norm(dim=1)[:, None] * (alpha.double().abs() * keys.double().norm(dim=1))[None]
    fma = 2.0 ** -23 * (size * (1 + c) + beta.double().abs()[None])  # s rounded once, with room
    definition = (d + 3) * 2.0 ** -52 * size
    return certify.SAFETY * (c * size + fma + definition) + 1e-30


def thresholds(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor, fractions=FRACTIONS) -> Tensor:
    """(N,) float32: row i's threshold lets about fractions[i % len] of the keys through."""
    n, m = q.shape[0], keys.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=q.device)
    for r0 in range(0, n, CHECK_ROWS):
        s = scores64(q[r0:r0 + CHECK_ROWS], keys, alpha, beta)
        f = [fractions[i % len(fractions)] for i in range(r0, r0 + s.shape[0])]
        rank = torch.tensor([max(1, min(m, math.ceil((x or 0) * m))) for x in f], device=q.device)
        t = s.sort(dim=1, descending=True).values.gather(1, rank[:, None] - 1)[:, 0]
        t = torch.where(torch.tensor([x == 0 for x in f], device=q.device), s.max(dim=1).values + 1, t)
        t = torch.where(torch.tensor([x is None for x in f], device=q.device), -float("inf"), t)
        out[r0:r0 + s.shape[0]] = t.float()
    return out


def check_emit(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor, threshold: Tensor, capacity: int,
               got: tuple, context: str) -> dict:
    """Asserts emit's (count, cols, scores) for these inputs; returns {"overflow": rows past capacity,
    "emitted": pairs stored, "band": pairs either way}."""
    count, cols, scores = got
    n, m = q.shape[0], keys.shape[0]
    assert count.shape == (n,) and count.dtype == torch.int32, context
    assert cols.shape == (n, capacity) and cols.dtype == torch.int32, context
    assert scores.shape == (n, capacity) and scores.dtype == torch.float32, context
    stats = {"overflow": 0, "emitted": 0, "band": 0}
    for r0 in range(0, n, CHECK_ROWS):
        rows = slice(r0, min(n, r0 + CHECK_ROWS))
        s64 = scores64(q[rows], keys, alpha, beta)
        eps = errors(q[rows], keys, alpha, beta)
        t = threshold[rows].double()[:, None]
        must = (s64 >= t + eps).sum(1)
        may_mask = s64 >= t - eps
        may = may_mask.sum(1)
        stats["band"] += int((may - must).sum())
        cnt = count[rows].long()
        bad = ((cnt < must) | (cnt > may)).nonzero().flatten()
        assert bad.numel() == 0, (f"{context}: counts outside [must, may] in rows {(bad + r0).tolist()[:5]}: "
                                  f"{cnt[bad][:5].tolist()} vs {must[bad][:5].tolist()}..{may[bad][:5].tolist()}")
        stored = cnt.clamp(max=capacity)
        stats["overflow"] += int((cnt > capacity).sum())
        stats["emitted"] += int(stored.sum())
        slot_ok = torch.arange(capacity, device=q.device)[None] < stored[:, None]
        slot_row, slot = slot_ok.nonzero(as_tuple=True)
        col = cols[rows][slot_row, slot].long()
        assert ((col >= 0) & (col < m)).all(), f"{context}: a key index outside [0, {m})"
        emitted = torch.zeros_like(may_mask)
        emitted[slot_row, col] = True
        assert int(emitted.sum()) == slot_row.numel(), f"{context}: a key emitted twice in a row"
        assert not (emitted & ~may_mask).any(), f"{context}: a key emitted below threshold - eps"
        value = scores[rows][slot_row, slot]
        assert (value >= threshold[rows][slot_row]).all(), f"{context}: an emitted score below its threshold (fp32)"
        err = (value.double() - s64[slot_row, col]).abs()
        assert (err <= eps[slot_row, col]).all(), (
            f"{context}: emitted scores off by up to {float(err.max()):.3g} (bound {float(eps.min()):.3g}..)")
        # a row with room emitted every pair that must qualify
        room = (cnt <= capacity)[:, None]
        missed = (s64 >= t + eps) & room & ~emitted
        assert not missed.any(), (f"{context}: {int(missed.sum())} qualifying pairs missing, in rows "
                                  f"{(missed.any(1).nonzero().flatten()[:5] + r0).tolist()}")
    return stats
