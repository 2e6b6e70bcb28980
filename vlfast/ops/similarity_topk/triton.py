"""Triton kernel for similarity_topk's candidate filter (filter.py has the algorithm and the contract).

  _emit_kernel  per (row block, key split): streams key tiles past the row block, scores them on tensor
                cores exactly as the codebook scan does (codebook_lookup/triton.py's row_block and
                dot_tile; s = alpha_j <q_i, k_j> + beta_j, fp32 accumulation, float32 inputs as bf16x3),
                and appends every pair with s >= t_i to row i's buffer: one atomic add per row and
                tile reserves the slots, then one round per hit of the busiest row stores each row's
                next hit. Pairs past the top are rare (about 2 k + the 2 eps band per row), so a tile where
                no pair qualifies costs one compare and one reduction beyond its MMAs.
  _pair_score_kernel  the candidates' float64 sums, bit for bit the definition's (reference.py).
Splits along the keys fill the GPU when N is small (codebook_lookup/splits.py's plan). The buffer's
order depends on the atomics' order; filter.py sorts what it reads, so results do not.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _scratch
from ..._backends import triton_interpreting
from ..._launch_configs import KernelConfigs, chosen
from ..codebook_lookup import certify
from ..codebook_lookup import triton as scan
from ..codebook_lookup.splits import plan as split_plan
from . import filter as _filter
from . import reference

_INTERPRET = triton_interpreting()


# The codebook scan's families (the same main loop; the append path runs on few tiles). To be narrowed
# by measurement on the H200.
EMIT_CONFIGS = KernelConfigs("similarity_topk.emit", scan.candidates, interpreter=scan.INTERPRETER_CONFIG)
launch_key = scan.launch_key


@triton.heuristics(scan.FEATURE_HEURISTICS)
@triton.jit
def _emit_kernel(q_ptr, k_ptr, alpha_ptr, beta_ptr, threshold_ptr, count_ptr, cols_ptr, scores_ptr,
                 N, M, keys_per_split, capacity, stride_z, stride_e, D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK_MAX: tl.constexpr, BK: tl.constexpr, NUM_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    lanes = tl.arange(0, BN)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_z
    q_tile = scan.row_block(q_rows, row_ok, D, UPCAST, BK, NUM_K, EVEN_K)
    t = tl.load(threshold_ptr + rows, mask=row_ok, other=float("inf"))
    start = pid_s * keys_per_split
    end = tl.minimum(M, start + keys_per_split)
    for c0 in range(start, end, BN):
        cols = c0 + lanes
        col_ok = cols < end
        dot = scan.dot_tile(q_tile, q_rows, row_ok, k_ptr, cols, col_ok, stride_e, D, DOT_PRECISION, UPCAST,
                            BM, BN, BK, NUM_K, EVEN_K)
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=0.0)
        s = alpha[None, :] * dot + beta[None, :]
        hit = (s >= t[:, None]) & col_ok[None, :] & row_ok[:, None]  # NaN never qualifies
        hits = tl.sum(hit.to(tl.int32), axis=1)
        rounds = tl.max(hits)
        if rounds > 0:  # most tiles: nothing to append
            # One atomic add per row reserves its hits' slots; then each round appends every row's next
            # hit (lowest lane first) with per-row stores: 1-D addresses only, which keeps the registers
            # of the MMA tile's layout free (a 2-D scatter of the whole tile needs twice the kernel's).
            base = tl.atomic_add(count_ptr + rows, hits, mask=hits > 0, sem="relaxed")
            row_slots = rows.to(tl.int64) * capacity
            pending = hit
            for r in range(rounds):
                lane = tl.min(tl.where(pending, lanes[None, :], BN), axis=1)  # BN: none left in this row
                picked = pending & (lanes[None, :] == lane[:, None])
                value = tl.sum(tl.where(picked, s, 0.0), axis=1)  # the one picked score, exactly
                keep = (lane < BN) & (base + r < capacity)  # past capacity: counted, not stored
                tl.store(cols_ptr + row_slots + base + r, c0 + lane, mask=keep)
                tl.store(scores_ptr + row_slots + base + r, value, mask=keep)
                pending = pending & ~picked


@triton.jit
def _pair_terms(q_at, k_at, d, ok, METRIC: tl.constexpr):
    """Feature d of each pair in float64: (the dot or squared-distance term, q^2, k^2)."""
    x = tl.load(q_at + d, mask=ok, other=0.0).to(tl.float64)
    y = tl.load(k_at + d, mask=ok, other=0.0).to(tl.float64)
    if METRIC == 2:
        return (x - y) * (x - y), x * x, y * y
    return x * y, x * x, y * y


@triton.jit
def _pair_score_kernel(q_ptr, k_ptr, row_ptr, col_ptr, out_ptr, P, D, stride_z, stride_e,
                       METRIC: tl.constexpr, BP: tl.constexpr):
    """reference.pair_scores's ordered sums for pairs (row_p, col_p), the same bits: each pair's float64
    sums run in feature order from the first term (one lane per pair), launched without fused
    multiply-adds. out (P,): the score; cosine: (3, P), <q, k>, |q|^2 and |k|^2."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    ok = p < P
    q_at = q_ptr + tl.load(row_ptr + p, mask=ok, other=0).to(tl.int64) * stride_z
    k_at = k_ptr + tl.load(col_ptr + p, mask=ok, other=0).to(tl.int64) * stride_e
    acc, qq, kk = _pair_terms(q_at, k_at, 0, ok, METRIC)
    for d in range(1, D):
        term, q2, k2 = _pair_terms(q_at, k_at, d, ok, METRIC)
        acc += term
        if METRIC == 1:
            qq += q2
            kk += k2
    if METRIC == 2:
        acc = -acc
    tl.store(out_ptr + p, acc, mask=ok)
    if METRIC == 1:
        tl.store(out_ptr + P + p, qq, mask=ok)
        tl.store(out_ptr + 2 * P + p, kk, mask=ok)


_METRIC_CODES = {"ip": 0, "cosine": 1, "l2": 2}


def pair_scores(q: Tensor, keys: Tensor, row: Tensor, col: Tensor, metric: str) -> Tensor:
    """(P,) float64: reference.pair_scores(q[row], keys[col], metric), the same bits, without gathering."""
    out = torch.empty(3 if metric == "cosine" else 1, row.numel(), dtype=torch.float64, device=q.device)
    if row.numel():
        _pair_score_kernel[(triton.cdiv(row.numel(), 128),)](
            q, keys, row, col, out, row.numel(), q.shape[1], q.stride(0), keys.stride(0),
            METRIC=_METRIC_CODES[metric], BP=128, num_warps=4, enable_fp_fusion=False)
    return reference.cosine_of_sums(*out) if metric == "cosine" else out[0]


def emit(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor, threshold: Tensor,
         capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count (N,) int32, cols (N, capacity) int32, scores (N, capacity) fp32): filter.Emit's contract."""
    n, d = q.shape
    m = keys.shape[0]

    def emit_pass(config) -> tuple:
        """The kernel on one config, into fresh outputs (autotuning repeats it)."""
        count = torch.zeros(n, dtype=torch.int32, device=q.device)
        cols = torch.empty(n, capacity, dtype=torch.int32, device=q.device)
        scores = _scratch.empty(n, capacity, dtype=torch.float32, device=q.device)
        row_blocks = triton.cdiv(n, config.kwargs["BM"])
        splits, per_split = split_plan(row_blocks, m, q.device, scan.MAX_BN)
        _emit_kernel[(row_blocks, splits)](q, keys, alpha, beta, threshold, count, cols, scores, n, m, per_split,
                                           capacity, q.stride(0), keys.stride(0), D=d,
                                           DOT_PRECISION=scan.dot_precision(q.dtype),
                                           UPCAST=_INTERPRET and q.dtype == torch.bfloat16, **config.kwargs,
                                           num_warps=config.num_warps, num_stages=config.num_stages)
        return count, cols, scores

    return emit_pass(EMIT_CONFIGS.choose(launch_key(q.dtype, d), emit_pass))


# The last call's rows, rows that took the torch path, and candidates scored in float64.
last_call = {"rows": 0, "fallback": 0, "rescored": 0}


def describe() -> dict:
    """For benchmark rows: the emit kernel's configs chosen so far, and the last call's counts."""
    return {"emit": chosen("similarity_topk.emit").get("similarity_topk.emit", {}), **last_call}


def similarity_topk(q: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, scores (N, k) float64); q (N, D) and keys (M, D) with unit feature stride."""
    return _filter.search(q, keys, k, metric, emit, certify.dot_error(q.dtype, q.shape[1]),
                          certify.products(q.dtype), last_call, pair_scores)
