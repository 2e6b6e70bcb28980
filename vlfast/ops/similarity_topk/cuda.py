"""CUDA C++ path for similarity_topk's candidate filter: the kernel in csrc/similarity_topk/, reached through
vlfast._C.

Same contract as triton.emit (filter.py has the algorithm): per row block and key split the kernel
scores s_ij = alpha_j <q_i, k_j> + beta_j in fp32 with the codebook scan's arithmetic, so with its
error bound (certify.dot_error, certify.products): 16-bit inputs on tensor cores (mma.sync, fp32
accumulation), float32 inputs split into bf16 pieces and three products per feature (bf16x3). Every
pair with s_ij >= threshold_i is counted in count_i and, while the row's buffer has room, written to
its slots (key and score); the count stays exact past capacity, and the slots' order follows the
atomics'. Key splits fill the GPU when N is small (codebook_lookup/splits.py's plan).

The extension takes plain integers (data_ptr(), sizes, strides in elements, a dtype code from
_C.DTYPE_CODES, the device index and the current stream's handle) and checks them itself. Its
16-bit loads want rows on 16-byte boundaries: rows that are not are copied once per call into a
buffer with padded rows (codebook_lookup/cuda.py's kernel_rows).

pair_scores scores the certified candidates in float64, bit for bit the definition's (reference.py's
pair_scores; triton.pair_scores is the same contract): one thread per pair, ordered sums, no fused
multiply-adds (csrc/similarity_topk/pair_scores.cu), in one launch instead of a gather per chunk.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _scratch
from ..._backends import cuda_extension_for, cuda_why_not_for
from ..._cuda_args import common_args
from ..codebook_lookup import certify, splits
from ..codebook_lookup.cuda import kernel_rows
from . import reference

DOT_ERROR = certify.dot_error  # the kernel computes what the codebook scan computes (module docstring)


def why_not(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA kernel can run inputs of this device and dtype, else the reason."""
    return cuda_why_not_for("similarity_topk", device, dtype)


def _extension(q: Tensor):
    return cuda_extension_for("similarity_topk", q.device, q.dtype)


def _vector(x: Tensor, length: int, name: str) -> Tensor:
    """x as the kernel reads it: (length,) contiguous float32."""
    if x.shape != (length,):
        raise ValueError(f"vlfast.similarity_topk: {name} must have shape ({length},), got {tuple(x.shape)}")
    return x.to(torch.float32).contiguous()


def emit(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor, threshold: Tensor,
         capacity: int) -> tuple[Tensor, Tensor, Tensor]:
    """(count (N,) int32, cols (N, capacity) int32, scores (N, capacity) fp32): filter.Emit's contract.

    q (N, D) and keys (M, D) share a dtype and a device, unit feature stride; alpha, beta (M,) and
    threshold (N,) float32. Slots at or past min(count_i, capacity) are unspecified."""
    ext = _extension(q)
    n, d = q.shape
    m = keys.shape[0]
    q, keys = kernel_rows(q), kernel_rows(keys)
    alpha, beta = _vector(alpha, m, "alpha"), _vector(beta, m, "beta")
    threshold = _vector(threshold, n, "threshold")
    common = common_args(ext, q)
    rows, cols_per_tile = ext.similarity_topk_tile(common["dtype"])
    n_splits, per_split = splits.plan(-(-n // rows), m, q.device, cols_per_tile)
    count = torch.zeros(n, dtype=torch.int32, device=q.device)
    cols = torch.empty(n, capacity, dtype=torch.int32, device=q.device)
    scores = _scratch.empty(n, capacity, dtype=torch.float32, device=q.device)
    work_size = ext.similarity_topk_work_bytes(n=n, m=m, d=d, dtype=common["dtype"])
    work = torch.empty(work_size, dtype=torch.uint8, device=q.device) if work_size else None
    ext.similarity_topk_emit(q=q.data_ptr(), keys=keys.data_ptr(), alpha=alpha.data_ptr(), beta=beta.data_ptr(),
                             threshold=threshold.data_ptr(), count=count.data_ptr(),
                             cols=cols.data_ptr() if capacity else 0, scores=scores.data_ptr() if capacity else 0,
                             work=0 if work is None else work.data_ptr(), work_size=work_size, n=n, m=m, d=d,
                             stride_q=q.stride(0), stride_k=keys.stride(0), capacity=capacity,
                             keys_per_split=per_split, splits=n_splits, **common)
    return count, cols, scores


_METRIC_CODES = {"ip": 0, "cosine": 1, "l2": 2}  # similarity_topk.h's pair_scores


def _element_rows(x: Tensor) -> Tensor:
    """x as pair_scores' kernel reads it: rows of unit feature stride, not overlapping (stride >= D); the
    kernel reads one element at a time, so any row alignment does."""
    d = x.shape[1]
    return x if (x.stride(1) == 1 or d == 1) and x.stride(0) >= d else x.contiguous()


def pair_scores(q: Tensor, keys: Tensor, row: Tensor, col: Tensor, metric: str) -> Tensor:
    """(P,) float64: reference.pair_scores(q[row], keys[col], metric), the same bits, without gathering.

    q (N, D) and keys (M, D) share a dtype and a device; row, col (P,) index them. One thread per pair
    sums in float64 in feature order, without fused multiply-adds; the cosine's three sums are combined
    by reference.cosine_of_sums (PyTorch's sqrt and division: every path's bits)."""
    ext = _extension(q)
    n, d = q.shape
    p = row.numel()
    out = torch.empty(3 if metric == "cosine" else 1, p, dtype=torch.float64, device=q.device)
    if p:
        q, keys = _element_rows(q), _element_rows(keys)
        row = row.to(torch.int64).contiguous()
        col = col.to(torch.int64).contiguous()
        ext.similarity_topk_pair_scores(q=q.data_ptr(), keys=keys.data_ptr(), row=row.data_ptr(), col=col.data_ptr(),
                                        out=out.data_ptr(), p=p, n=n, m=keys.shape[0], d=d, stride_q=q.stride(0),
                                        stride_k=keys.stride(0), metric=_METRIC_CODES[metric],
                                        **common_args(ext, q))
    return reference.cosine_of_sums(*out) if metric == "cosine" else out[0]


# The last call's rows, rows that took the torch path, and candidates scored in float64.
last_call = {"rows": 0, "fallback": 0, "rescored": 0}


def describe() -> dict:
    """For benchmark rows: the last call's counts."""
    return dict(last_call)


def similarity_topk(q: Tensor, keys: Tensor, k: int, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, scores (N, k) float64); q (N, D) and keys (M, D) with unit feature stride."""
    from . import filter as _filter  # the algorithm shared with triton.py
    _extension(q)  # the reason, before any work, when the kernel cannot run
    return _filter.search(q, keys, k, metric, emit, DOT_ERROR(q.dtype, q.shape[1]), certify.products(q.dtype),
                          last_call, pair_scores)
