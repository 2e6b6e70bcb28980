"""CUDA C++ path for the codebook lookup: the kernels in csrc/codebook_lookup/, reached through vlfast._C.

Same algorithm as triton.py, with the same partial results: the scan writes per codebook split and
row the best score alpha_j <z_i, e_j> + beta_j, its lowest index and the second-best score
(splits.py merges the splits), certify.py turns that into the exact argmin, and a float64 kernel
gives the chosen codes' distances. The scan's arithmetic is the Triton scan's, so it has the same
error bound (certify.dot_error, certify.products): 16-bit inputs on tensor cores (mma.sync, fp32
accumulation), float32 inputs split into bf16 pieces and three products per feature (bf16x3).

The extension takes plain integers (data_ptr(), sizes, strides in elements, a dtype code from
_C.DTYPE_CODES, the device index and the current stream's handle) and checks them itself. Its
16-bit loads want rows on 16-byte boundaries: rows that are not (D = 100 in bf16, a view starting
mid-row, an expanded codebook) are copied once per call into a buffer with padded rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ... import _scratch
from ..._backends import cuda_extension_for, cuda_why_not_for
from ..._cuda_args import ROW_ALIGN, aligned_rows, common_args
from . import certify, splits

DOT_ERROR = certify.dot_error  # the kernels compute what the Triton scan computes (module docstring)


def why_not(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA kernels can run inputs of this device and dtype, else the reason."""
    return cuda_why_not_for("codebook_lookup", device, dtype)


def _extension(z: Tensor):
    return cuda_extension_for("codebook_lookup", z.device, z.dtype)


def kernel_rows(x: Tensor) -> Tensor:
    """x laid out as the kernels read it: 16-byte aligned rows for 16-bit inputs (cp.async), any
    non-overlapping rows for float32 (read one element at a time)."""
    return aligned_rows(x, ROW_ALIGN if x.element_size() == 2 else x.element_size())


def scan(z: Tensor, e: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(best (N,) fp32, second (N,) fp32, index (N,) int32) as triton.scan; z and e as kernel_rows gives them."""
    ext = _extension(z)
    n, d = z.shape
    k = e.shape[0]
    common = common_args(ext, z)
    rows, codes = ext.codebook_lookup_tile(common["dtype"])
    n_splits, per_split = splits.plan(-(-n // rows), k, z.device, codes)
    best = _scratch.empty(n_splits, n, dtype=torch.float32, device=z.device)
    second = _scratch.empty(n_splits, n, dtype=torch.float32, device=z.device)
    index = torch.empty(n_splits, n, dtype=torch.int32, device=z.device)
    work_size = ext.codebook_lookup_work_bytes(n=n, k=k, d=d, dtype=common["dtype"])
    work = torch.empty(work_size, dtype=torch.uint8, device=z.device) if work_size else None
    ext.codebook_lookup_scan(z=z.data_ptr(), e=e.data_ptr(), alpha=alpha.data_ptr(), beta=beta.data_ptr(),
                             best=best.data_ptr(), second=second.data_ptr(), index=index.data_ptr(),
                             work=0 if work is None else work.data_ptr(), work_size=work_size, n=n, k=k, d=d,
                             stride_z=z.stride(0), stride_e=e.stride(0), codes_per_split=per_split,
                             splits=n_splits, **common)
    return splits.merge(best, second, index)


def distances(z: Tensor, e: Tensor, index: Tensor, metric: str) -> Tensor:
    """(N,) float32: each row's float64 distance to its code index (N,) int64, as triton.distances."""
    ext = _extension(z)
    n, d = z.shape
    out = _scratch.empty(n, dtype=torch.float32, device=z.device)
    ext.codebook_lookup_distances(z=z.data_ptr(), e=e.data_ptr(), index=index.data_ptr(), out=out.data_ptr(), n=n,
                                  k=e.shape[0], d=d, stride_z=z.stride(0), stride_e=e.stride(0),
                                  cosine=metric == "cosine", **common_args(ext, z))
    return out


# The last call's number of rows and rows re-scored in float64 (for benchmark reports and tests).
last_call = {"rows": 0, "rescored": 0}


def describe() -> dict:
    """For benchmark rows: the last call's re-scored rows."""
    return dict(last_call)


def lookup(z: Tensor, e: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    """(indices (N,) int64, distances (N,) float32); z (N, D) and e (K, D) with unit feature stride."""
    _extension(z)  # the reason, before any work, when the kernels cannot run
    z, e = kernel_rows(z), kernel_rows(e)
    index, dist, rescored = certify.lookup(z, e, metric, scan, distances, DOT_ERROR(z.dtype, z.shape[1]),
                                           certify.products(z.dtype))
    last_call.update(rows=z.shape[0], rescored=rescored)
    return index, dist
