"""Codebook nearest-neighbour lookup in plain PyTorch: the specification, and the exact CPU path.

Notation shared by every implementation of this op: z (N, D) query rows, e (K, D) the codebook.

The specification, in float64 on the values given, each sum taken in order k = 0 .. D-1 (a fixed
order, so that any device evaluates it to the same bits):
  metric="l2":     value_ij = sum_k (z_ik - e_jk)^2                 distance_i = value_i,index_i
  metric="cosine": value_ij = -<z_i, e_j> / |e_j|  (0 where |e_j| = 0)
                   distance_i = 1 - <z_i, e_index_i> / (|z_i| |e_index_i|)  (1 where either norm is 0)
  index_i = argmin_j value_ij, ties to the lowest j (torch.argmin's rule).
For cosine, |z_i| is constant along a row, so the argmin of value is the argmax of the cosine; a zero
vector has cosine 0 with everything (as F.normalize makes it): a zero row of z picks code 0.
Distances are returned as float32.

`spec_lookup` evaluates that definition directly (the tests' oracle; O(N K D) elementwise work).
`lookup` is the CPU path: a float64 GEMM scores every code, a rigorous bound on that GEMM's error
keeps only the codes that could still be the argmin (almost always one), and those are re-scored by
the definition. `exact_indices` is that procedure for any subset of rows: the GPU paths call it for
the rows whose low-precision filter could not decide.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _workspace

# Elements of one float64 work chunk: bounds extra memory (64 MiB) whatever N and K are.
CHUNK_ELEMENTS = 1 << 23
# Rows x D elements of one chunk of chosen_distances. Off a CPU its float64 temporaries (a few per chunk)
# stay at 512 KiB, which the C library keeps in its heap; 64 MiB ones were handed back to the system and
# faulted in again on every call (10k page faults, ~2 ms of a 5 ms lookup at 4096 x 64).
PAIR_CHUNK_ELEMENTS = 1 << 16
# The same on a CPU, where the chunk lives in scratch buffers kept between calls (4 x 1 MiB at most):
# 2048 x 64 rows take one chunk, not two (a chunk's ~20 operations cost ~0.05 ms).
CPU_PAIR_CHUNK_ELEMENTS = 1 << 17
METRICS = ("l2", "cosine")
U64 = 2.0 ** -53  # float64 unit roundoff


def _ordered_sum(terms) -> Tensor:
    """Sum of the tensors from `terms` (an iterator over k), added in that order."""
    total = next(terms).clone()
    for t in terms:
        total += t
    return total


def ordered_row_sums(x: Tensor) -> Tensor:
    """x (P, D) float64 -> (P,): each row summed in order k = 0 .. D-1, the same bits as _ordered_sum.

    On a CPU a running sum (cumsum) along a row is sequential, so its last element is that sum, in a
    few vectorised operations; elsewhere cumsum is a parallel scan (another order): the loop.
    """
    if x.device.type == "cpu":
        return x.cumsum(dim=1)[:, -1]
    return _ordered_sum(x[:, k] for k in range(x.shape[1]))


def pair_values(z: Tensor, e: Tensor, metric: str) -> Tensor:
    """spec_values for (row, code) pairs z (P, D), e (P, D) -> (P,) float64, the same bits."""
    z, e = z.double(), e.double()
    if metric == "l2":
        return ordered_row_sums((z - e) ** 2)
    dot, norm_e = ordered_row_sums(z * e), ordered_row_sums(e ** 2).sqrt()
    return torch.where(norm_e > 0, -dot / torch.where(norm_e > 0, norm_e, 1.0), 0.0)


def spec_values(z: Tensor, e: Tensor, metric: str) -> Tensor:
    """The value to minimise, float64, for broadcastable z (..., D) and e (..., D) -> broadcast shape.

    One function for blocks (z[:, None], e[None]) and for (row, code) pairs, so both give the same bits.
    """
    z, e = z.double(), e.double()
    d = z.shape[-1]
    if metric == "l2":
        return _ordered_sum(((z[..., k] - e[..., k]) ** 2) for k in range(d))
    dot = _ordered_sum(z[..., k] * e[..., k] for k in range(d))
    norm_e = _ordered_sum(e[..., k] ** 2 for k in range(d)).sqrt()
    return torch.where(norm_e > 0, -dot / torch.where(norm_e > 0, norm_e, 1.0), 0.0)


def spec_distances(z: Tensor, chosen: Tensor, metric: str) -> Tensor:
    """distance_i of row z_i (R, D) to its code chosen_i (R, D), float64 (R,)."""
    value = pair_values(z, chosen, metric)
    if metric == "l2":
        return value
    norm_z = ordered_row_sums(z.double() ** 2).sqrt()
    return torch.where(norm_z > 0, 1.0 + value / torch.where(norm_z > 0, norm_z, 1.0), 1.0)


def _row_chunk(k: int, d: int = 1) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, k * d))


def spec_lookup(z: Tensor, e: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """The definition evaluated for every (row, code): (indices (N,) int64, distances (N,) float64).

    Memory: a few (rows x K) float64 blocks; time: O(N K D) elementwise operations.
    """
    n = z.shape[0]
    index = torch.empty(n, dtype=torch.int64, device=z.device)
    for r0 in range(0, n, _row_chunk(e.shape[0])):
        r1 = min(n, r0 + _row_chunk(e.shape[0]))
        index[r0:r1] = spec_values(z[r0:r1, None, :], e[None, :, :], metric).argmin(dim=1)
    return index, chosen_distances(z, e, index, metric).double()


def chosen_distances(z: Tensor, e: Tensor, index: Tensor, metric: str) -> Tensor:
    """float32 distances (N,) of each row to its chosen code, by the definition (spec_distances' bits)."""
    n, d = z.shape
    out = torch.empty(n, dtype=torch.float32, device=z.device)
    if z.device.type == "cpu" and n and d:
        return _chosen_distances_cpu(z, e, index, metric, max(1, CPU_PAIR_CHUNK_ELEMENTS // d), out)
    step = max(1, PAIR_CHUNK_ELEMENTS // max(1, d))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        out[r0:r1] = spec_distances(z[r0:r1], e[index[r0:r1]], metric).float()
    return out


def _chosen_distances_cpu(z: Tensor, e: Tensor, index: Tensor, metric: str, step: int, out: Tensor) -> Tensor:
    """chosen_distances on a CPU: spec_distances' operations in the same order (so the same bits), on
    scratch buffers kept between calls. Each fresh float64 temporary of a chunk was faulted in page by
    page (~250 faults, 0.6-0.9 ms of a 4096 x 64 lookup)."""
    rows = min(step, z.shape[0])
    d = z.shape[1]

    def scratch(name, dtype=torch.float64):
        return _workspace.matrix(f"codebook_lookup.distances.{name}", rows, d, dtype, z.device)

    z64, e64, prod = scratch("z"), scratch("e"), scratch("prod")
    codes = scratch("codes", e.dtype)
    for r0 in range(0, z.shape[0], step):
        r1 = min(z.shape[0], r0 + step)
        c = r1 - r0
        zc, ec, pc = z64[:c], e64[:c], prod[:c]
        zc.copy_(z[r0:r1])
        ec.copy_(torch.index_select(e, 0, index[r0:r1], out=codes[:c]))
        # each running sum overwrites its own terms (cumsum reads a term before it writes that place)
        if metric == "l2":
            torch.sub(zc, ec, out=pc)
            out[r0:r1] = torch.cumsum(pc.mul_(pc), 1, out=pc)[:, -1]  # x * x: pow(x, 2)'s bits
            continue
        dot = torch.cumsum(torch.mul(zc, ec, out=pc), 1, out=pc)[:, -1]
        norm_e = torch.cumsum(ec.mul_(ec), 1, out=ec)[:, -1].sqrt()
        norm_z = torch.cumsum(zc.mul_(zc), 1, out=zc)[:, -1].sqrt()
        # no zero row or code (a product that underflows to 0 only takes the general path): the where()s
        # pick these operations (~10 operations fewer)
        if norm_e.mul(norm_z).amin().item() > 0:  # 1 + (-dot / |e|) / |z|, as 1 - (dot / |e|) / |z|: same bits
            torch.sub(1.0, torch.div(dot, norm_e).div_(norm_z), out=out[r0:r1])
            continue
        value = torch.where(norm_e > 0, -dot / torch.where(norm_e > 0, norm_e, 1.0), 0.0)
        out[r0:r1] = torch.where(norm_z > 0, 1.0 + value / torch.where(norm_z > 0, norm_z, 1.0), 1.0)
    return out


def check_finite(name: str, x: Tensor, rows: Optional[Tensor] = None) -> None:
    """ValueError naming `name` and the first offending row if x (or x[rows]) has inf or NaN."""
    if x.numel() == 0 or bool(torch.isfinite(x.abs().amax())):  # isfinite(x) is ~100x slower on a CPU
        return
    bad = ~torch.isfinite(x).all(dim=-1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        where = int(rows[first]) if rows is not None else first
        raise ValueError(f"vlfast.codebook_lookup: {name} must be finite; row {where} (of the flattened "
                         f"(-1, D) view) holds inf or NaN")


def _filter_scores(z64: Tensor, e64: Tensor, sq_e: Tensor, inv_e: Tensor, metric: str) -> Tensor:
    """GEMM-form scores (R, K): ||e||^2 - 2 z.e (l2; the row constant ||z||^2 dropped) or -z.e / |e|."""
    scores = z64 @ e64.T  # then in place: one (R, K) buffer
    if metric == "l2":
        return scores.mul_(-2.0).add_(sq_e)
    return scores.mul_(inv_e).neg_()


def _filter_error(norm_z: Tensor, max_norm_e: Tensor, d: int, metric: str) -> Tensor:
    """A bound (R,) on |filter score - exact value| plus |definition in float64 - exact value|.

    Each float64 error is at most (D + 4) u times ||z|| ||e||, ||e||^2 or ||z - e||^2 <= (||z|| + ||e||)^2
    (recursive-summation bounds for the GEMM, the norms and the ordered sums); twice that, doubled
    again for the slack of the norms themselves being rounded.
    """
    scale = (norm_z + max_norm_e) ** 2 if metric == "l2" else norm_z
    return (4 * d + 16) * U64 * scale


def exact_indices(z: Tensor, e: Tensor, metric: str, rows: Optional[Tensor] = None) -> Tensor:
    """The definition's argmin (R,) int64 for z[rows] (all rows if None), in bounded memory.

    Per chunk of rows: float64 GEMM scores; every code within twice the error bound of the row's best
    score is a candidate (the true argmin always is); candidates are re-scored by the definition and
    the lowest index among the smallest values wins. Raises ValueError if those rows of z are not finite.
    """
    zr = z if rows is None else z[rows]
    check_finite("z", zr, rows)
    k, d = e.shape
    e64 = e.double()
    norm_e = torch.linalg.vector_norm(e64, dim=1)
    sq_e, inv_e = norm_e ** 2, torch.where(norm_e > 0, 1.0 / torch.where(norm_e > 0, norm_e, 1.0), 0.0)
    max_norm_e = norm_e.max()
    out = torch.empty(zr.shape[0], dtype=torch.int64, device=z.device)
    step = _row_chunk(k)
    for r0 in range(0, zr.shape[0], step):
        z64 = zr[r0:r0 + step].double()
        scores = _filter_scores(z64, e64, sq_e, inv_e, metric)
        bound = _filter_error(torch.linalg.vector_norm(z64, dim=1), max_norm_e, d, metric)
        threshold = scores.min(dim=1).values + 2 * bound
        candidates = scores <= threshold[:, None]
        # A non-finite threshold (float64 overflow on huge float64 inputs): every code is a candidate.
        candidates |= ~torch.isfinite(threshold)[:, None]
        out[r0:r0 + step] = best_candidate(z64, e64, candidates, metric)
    return out


def best_candidate(z64: Tensor, e64: Tensor, candidates: Tensor, metric: str) -> Tensor:
    """Per row of the (R, K) candidate mask: the lowest code index with the smallest definition value
    (z64 (R, D) float64; e (K, D) in any float dtype: its candidate rows are converted, exactly)."""
    r, d = z64.shape[0], z64.shape[1]
    pair_row, pair_code = candidates.nonzero(as_tuple=True)  # row-major: codes ascend within a row
    values = torch.empty(pair_row.shape[0], dtype=torch.float64, device=z64.device)
    step = max(1, CHUNK_ELEMENTS // max(1, d))  # all-equal codebooks make every code a candidate
    for p0 in range(0, pair_row.shape[0], step):
        sl = slice(p0, p0 + step)
        values[sl] = pair_values(z64[pair_row[sl]], e64[pair_code[sl]], metric)
    best = torch.full((r,), float("inf"), dtype=torch.float64, device=z64.device)
    best = best.scatter_reduce(0, pair_row, values, "amin")
    hit = values == best[pair_row]
    index = torch.full((r,), e64.shape[0], dtype=torch.int64, device=z64.device)
    return index.scatter_reduce(0, pair_row[hit], pair_code[hit], "amin")


def lookup(z: Tensor, e: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """The CPU path: (indices (N,) int64, distances (N,) float32), exact by the definition."""
    check_finite("codebook", e)
    index = exact_indices(z, e, metric)
    return index, chosen_distances(z, e, index, metric)
