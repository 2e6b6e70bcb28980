"""Triton kernels for the codebook lookup; the definition is in reference.py, exactness in certify.py.

  _scan_kernel      per (row block, codebook split): streams code tiles, score tile by tl.dot
                    (s = alpha_j <z_i, e_j> + beta_j, fp32 accumulation), and keeps per row the best
                    score, its index and the second-best score: O(N * splits) floats, never N x K.
                    A row block of z up to BK_MAX features wide stays in registers while the codebook
                    streams past; wider rows are reloaded per code tile in BK-wide pieces. D is a
                    compile-time constant (one compile per feature dimension): masks along it are
                    then known, which keeps loads of narrow rows (D = 8) vectorised.
  _distance_kernel  the chosen code's distance per row, in float64, rounded to float32.
Splits along the codebook fill the GPU when N is small; their partial results merge in PyTorch
(splits.py, shared with the CUDA scan).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _scratch
from ..._backends import triton_interpreting
from ..._launch_configs import KernelConfigs, chosen
from . import certify
from .splits import merge as merge_splits
from .splits import plan as split_plan

_INTERPRET = triton_interpreting()
# Codebook splits are multiples of the widest code tile, so every config tiles them exactly.
MAX_BN = 128


def _config(bm, bn, bk_max, warps, stages):
    return triton.Config({"BM": bm, "BN": bn, "BK_MAX": bk_max}, num_warps=warps, num_stages=stages)


# Families by input width and feature dimension; the first config of each is the default
# (vlfast/_launch_configs.py times all of one with VLFAST_AUTOTUNE=1; each costs a compile). Chosen
# by ahead-of-time compiles (tests/tools/triton_aot.py): wgmma on sm_90a, pipelined code tiles, no
# spills, shared memory within sm_80's 163 KB. For D <= 128 the default's 64-code tile keeps
# registers near 110, so two blocks share an SM and one's score epilogue (the running argmin, about
# as costly as the MMAs at D = 64) overlaps the other's MMAs. To be narrowed by measurement on the H200.
_FAMILIES = {
    "16-narrow": [_config(128, 64, 128, 8, 4), _config(128, 128, 128, 8, 3), _config(128, 128, 128, 8, 4)],
    "16-wide": [_config(128, 64, 256, 8, 3), _config(128, 128, 256, 8, 2), _config(128, 32, 256, 4, 3)],
    "16-chunked": [_config(128, 128, 64, 8, 3), _config(128, 64, 64, 8, 4)],
    "32-narrow": [_config(64, 64, 64, 4, 3), _config(64, 128, 64, 8, 3)],
    "32-chunked": [_config(64, 64, 32, 4, 3), _config(64, 128, 32, 8, 3)],
}
# The interpreter: one small config (it is slow); D > 64 takes the chunked path there.
INTERPRETER_CONFIG = _config(32, 32, 64, 4, 1)


def family(element_size: int, d: int) -> str:
    """Which config family a scan of inputs `element_size` bytes wide and D features uses."""
    if element_size == 4:
        return "32-narrow" if d <= 64 else "32-chunked"
    return "16-narrow" if d <= 128 else "16-wide" if d <= 256 else "16-chunked"


def launch_key(dtype: torch.dtype, d: int) -> tuple:
    """The key the scan's config is chosen by: (dtype name, input bytes per element, D)."""
    return (str(dtype).replace("torch.", ""), dtype.itemsize, d)


def candidates(key: tuple) -> list:
    """The configs of a launch_key, the default first (similarity_topk's emit kernel shares them)."""
    return _FAMILIES[family(key[1], key[2])]


SCAN_CONFIGS = KernelConfigs("codebook_lookup.scan", candidates,
                             interpreter=INTERPRETER_CONFIG)


def _block_k(args):
    return max(16, min(args["BK_MAX"], triton.next_power_of_2(args["D"])))


FEATURE_HEURISTICS = {"BK": _block_k,
               "NUM_K": lambda args: triton.cdiv(args["D"], _block_k(args)),
               "EVEN_K": lambda args: args["D"] % _block_k(args) == 0}


@triton.jit
def _load_tile(base, ks, ok, D, KS_ON_ROWS: tl.constexpr, EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """A (rows, BK) tile (KS_ON_ROWS False) or its transpose, zero outside `ok` and beyond D."""
    if KS_ON_ROWS:
        ptrs = base + ks[:, None]
        mask = ok[None, :] if EVEN_K else ok[None, :] & (ks[:, None] < D)
    else:
        ptrs = base + ks[None, :]
        mask = ok[:, None] if EVEN_K else ok[:, None] & (ks[None, :] < D)
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 is exact there
        x = x.to(tl.float32)
    return x


@triton.jit
def row_block(z_rows, row_ok, D, UPCAST: tl.constexpr, BK: tl.constexpr, NUM_K: tl.constexpr,
              EVEN_K: tl.constexpr):
    """The row block (BM, BK) that stays in registers when the features fit one piece (NUM_K == 1);
    otherwise a placeholder that dot_tile ignores (it reloads the rows piece by piece)."""
    if NUM_K == 1:
        tile = _load_tile(z_rows, tl.arange(0, BK), row_ok, D, False, EVEN_K, UPCAST)
    else:
        tile = tl.zeros((1, 1), dtype=tl.float32)
    return tile


@triton.jit
def dot_tile(z_tile, z_rows, row_ok, e_ptr, cols, col_ok, stride_e, D, DOT_PRECISION: tl.constexpr,
             UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NUM_K: tl.constexpr,
             EVEN_K: tl.constexpr):
    """(BM, BN) fp32 inner products of the row block with the codes `cols` (zero outside row_ok / col_ok):
    one tl.dot against the resident z_tile, or a pipelined loop over BK-wide pieces of the features."""
    ks = tl.arange(0, BK)
    e_cols = e_ptr + cols.to(tl.int64)[None, :] * stride_e
    if NUM_K == 1:
        e_tile = _load_tile(e_cols, ks, col_ok, D, True, EVEN_K, UPCAST)
        dot = tl.dot(z_tile, e_tile, input_precision=DOT_PRECISION)
    else:
        dot = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, D, BK):
            z_part = _load_tile(z_rows + k0, ks, row_ok, D - k0, False, EVEN_K, UPCAST)
            e_part = _load_tile(e_cols + k0, ks, col_ok, D - k0, True, EVEN_K, UPCAST)
            dot = tl.dot(z_part, e_part, dot, input_precision=DOT_PRECISION)
    return dot


@triton.heuristics(FEATURE_HEURISTICS)
@triton.jit
def _scan_kernel(z_ptr, e_ptr, alpha_ptr, beta_ptr, best_ptr, second_ptr, index_ptr,
                 N, K, codes_per_split, stride_z, stride_e, D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK_MAX: tl.constexpr, BK: tl.constexpr, NUM_K: tl.constexpr, EVEN_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < N
    lanes = tl.arange(0, BN)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    z_tile = row_block(z_rows, row_ok, D, UPCAST, BK, NUM_K, EVEN_K)
    start = pid_s * codes_per_split
    end = tl.minimum(K, start + codes_per_split)
    best = tl.full((BM,), float("inf"), dtype=tl.float32)
    second = tl.full((BM,), float("inf"), dtype=tl.float32)
    index = tl.zeros((BM,), dtype=tl.int32)
    for c0 in range(start, end, BN):
        cols = c0 + lanes
        col_ok = cols < end
        dot = dot_tile(z_tile, z_rows, row_ok, e_ptr, cols, col_ok, stride_e, D, DOT_PRECISION, UPCAST,
                       BM, BN, BK, NUM_K, EVEN_K)
        # Codes beyond the split get alpha 0, beta +inf: score +inf, never chosen.
        alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)
        beta = tl.load(beta_ptr + cols, mask=col_ok, other=float("inf"))
        s = alpha[None, :] * dot + beta[None, :]
        # Tile best, its first lane, and the best of the other lanes: three plain reductions, cheaper
        # than a (value, index) reduction with a tie-break.
        t1 = tl.min(s, axis=1)
        j1 = tl.min(tl.where(s == t1[:, None], lanes[None, :], BN), axis=1)
        t2 = tl.min(tl.where(lanes[None, :] == j1[:, None], float("inf"), s), axis=1)
        # Merge the tile into the running state; on equal scores the earlier (lower) index stays.
        better = t1 < best
        second = tl.where(better, tl.minimum(best, t2), tl.minimum(second, t1))
        index = tl.where(better, c0 + j1, index)
        best = tl.where(better, t1, best)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(best_ptr + out, best, mask=row_ok)
    tl.store(second_ptr + out, second, mask=row_ok)
    tl.store(index_ptr + out, index, mask=row_ok)


@triton.jit
def _distance_kernel(z_ptr, e_ptr, index_ptr, out_ptr, N, D, stride_z, stride_e,
                     COSINE: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr):
    """Float64 distance of each row to its chosen code (definition in reference.py), stored as fp32."""
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    ok = rows < N
    code = tl.load(index_ptr + rows, mask=ok, other=0)
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_z
    e_rows = e_ptr + code.to(tl.int64)[:, None] * stride_e
    acc = tl.zeros((BR,), dtype=tl.float64)  # l2: sum of squares; cosine: the dot product
    zz = tl.zeros((BR,), dtype=tl.float64)
    ee = tl.zeros((BR,), dtype=tl.float64)
    for d0 in range(0, D, BD):
        k = d0 + tl.arange(0, BD)
        m = ok[:, None] & (k[None, :] < D)
        x = tl.load(z_rows + k[None, :], mask=m, other=0.0).to(tl.float64)
        y = tl.load(e_rows + k[None, :], mask=m, other=0.0).to(tl.float64)
        if COSINE:
            acc += tl.sum(x * y, axis=1)
            zz += tl.sum(x * x, axis=1)
            ee += tl.sum(y * y, axis=1)
        else:
            acc += tl.sum((x - y) * (x - y), axis=1)
    if COSINE:
        norms = tl.sqrt(zz) * tl.sqrt(ee)
        acc = tl.where(norms > 0, 1.0 - acc / tl.where(norms > 0, norms, 1.0), 1.0)
    tl.store(out_ptr + rows, acc.to(tl.float32), mask=ok)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 runs as three bf16 products (certify.dot_error's model); 16-bit inputs ignore the setting.
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if _INTERPRET else "bf16x3"  # the interpreter knows no bf16x3; its fp32 dot is exact


def scan(z: Tensor, e: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(best (N,) fp32, second (N,) fp32, index (N,) int32) of the scores; certify.py has the contract."""
    n, d = z.shape
    k = e.shape[0]

    def scan_pass(config) -> tuple:
        """The scan on one config, into partial results sized for its row blocks."""
        row_blocks = triton.cdiv(n, config.kwargs["BM"])
        splits, per_split = split_plan(row_blocks, k, z.device, MAX_BN)
        best = _scratch.empty(splits, n, dtype=torch.float32, device=z.device)
        second = _scratch.empty(splits, n, dtype=torch.float32, device=z.device)
        index = torch.empty(splits, n, dtype=torch.int32, device=z.device)
        _scan_kernel[(row_blocks, splits)](z, e, alpha, beta, best, second, index, n, k, per_split,
                                           z.stride(0), e.stride(0), D=d, DOT_PRECISION=dot_precision(z.dtype),
                                           UPCAST=_INTERPRET and z.dtype == torch.bfloat16, **config.kwargs,
                                           num_warps=config.num_warps, num_stages=config.num_stages)
        return best, second, index

    best, second, index = scan_pass(SCAN_CONFIGS.choose(launch_key(z.dtype, d), scan_pass))
    return merge_splits(best, second, index)


def distances(z: Tensor, e: Tensor, index: Tensor, metric: str) -> Tensor:
    n, d = z.shape
    out = _scratch.empty(n, dtype=torch.float32, device=z.device)
    if n:
        _distance_kernel[(triton.cdiv(n, 64),)](z, e, index, out, n, d, z.stride(0), e.stride(0),
                                                COSINE=metric == "cosine", BR=64, BD=64)
    return out


# The last call's number of rows and rows re-scored in float64 (for benchmark reports and tests).
last_call = {"rows": 0, "rescored": 0}


def describe() -> dict:
    """For benchmark rows: the scan's configs chosen so far, and the last call's re-scored rows."""
    return {"scan": chosen("codebook_lookup.scan").get("codebook_lookup.scan", {}), **last_call}


def lookup(z: Tensor, e: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N,) int64, distances (N,) float32); z (N, D) and e (K, D) with unit feature stride."""
    c = certify.dot_error(z.dtype, z.shape[1])
    index, dist, rescored = certify.lookup(z, e, metric, scan, distances, c, certify.products(z.dtype))
    last_call.update(rows=z.shape[0], rescored=rescored)
    return index, dist
