"""Inputs and the exactness check for the codebook-lookup tests (CPU and GPU).

The oracle is reference.spec_lookup: the definition evaluated for every (row, code) in float64.
"""
from __future__ import annotations

import torch

from vlfast.ops.codebook_lookup.reference import spec_lookup

GAPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)


def random_case(n: int, k: int, d: int, dtype: torch.dtype, device="cpu", offset: float = 0.0):
    """z (n, d) and codebook (k, d): Gaussian, plus a common offset (cancellation when large)."""
    z = torch.randn(n, d, dtype=torch.float64) + offset
    e = torch.randn(k, d, dtype=torch.float64) + offset
    return z.to(device, dtype), e.to(device, dtype)


def planted_near_ties(k: int, d: int, dtype: torch.dtype, rows_per_gap: int = 8, device="cpu"):
    """z and a codebook in which each row's two nearest codes a, b differ by a relative gap from GAPS.

    Code b is code a with one coordinate moved by t, which changes the distance from z by
    t^2 - 2 t (z_k - a_k); t is chosen for the planted gap and rounded to the dtype, so the gaps that
    come out are near the planted ones (down to the dtype's resolution). Returns z, e and the planted
    gap of every row.
    """
    e = torch.randn(k, d, dtype=torch.float64).to(dtype).double()
    rows, gaps = [], []
    n_pairs = len(GAPS) * rows_per_gap
    pair_codes = torch.randperm(k)[: 2 * n_pairs].view(n_pairs, 2)
    for p, (ia, ib) in enumerate(pair_codes.tolist()):
        gap = GAPS[p // rows_per_gap]
        a = e[ia]
        z = (a + 0.05 * torch.randn(d, dtype=torch.float64)).to(dtype).double()
        dist = ((z - a) ** 2).sum()
        kk = int(torch.randint(d, ()))
        lever = float(z[kk] - a[kk])
        if lever == 0.0:
            lever = 1.0
        t = -gap * float(dist) / (2 * lever) * (1 if p % 2 else -1)  # either code may be the nearer
        b = a.clone()
        b[kk] = a[kk] + t
        e[ib] = b.to(dtype).double()
        rows.append(z)
        gaps.append(gap)
    return torch.stack(rows).to(device, dtype), e.to(device, dtype), torch.tensor(gaps)


def realised_gaps(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(second - best) / best of the float64 distances, per row."""
    dist = torch.cdist(z.double(), e.double()) ** 2
    two = dist.topk(2, dim=1, largest=False).values
    return (two[:, 1] - two[:, 0]) / two[:, 0].clamp(min=1e-300)


def assert_exact(z: torch.Tensor, e: torch.Tensor, metric: str, index: torch.Tensor, dist: torch.Tensor,
                 context: str = "") -> None:
    """indices equal the oracle's; distances are its float64 values rounded to float32 (1 ulp)."""
    d = z.shape[-1]
    want_index, want_dist = (t.cpu() for t in spec_lookup(z.reshape(-1, d), e, metric))  # on z's device
    got_index = index.reshape(-1).cpu()
    wrong = (got_index != want_index).nonzero().squeeze(1)
    assert wrong.numel() == 0, (f"{context}: {wrong.numel()} of {got_index.numel()} indices differ from the "
                                f"float64 argmin, first rows {wrong[:5].tolist()}: got "
                                f"{got_index[wrong[:5]].tolist()}, want {want_index[wrong[:5]].tolist()}")
    assert index.dtype == torch.int64 and dist.dtype == torch.float32
    assert index.shape == dist.shape == z.shape[:-1]
    torch.testing.assert_close(dist.reshape(-1).cpu().double(), want_dist, rtol=2.5e-7, atol=1e-30,
                               msg=lambda m: f"{context} distances: {m}")
