"""CUDA C++ path for the codebook lookup: a scan kernel in csrc/, reached through vlfast._C.

The kernel comes with the CUDA-extension work; until vlfast._C lists "codebook_lookup" in its OPS,
why_not reports impl="cuda" unavailable with the reason, so the dispatcher never reaches `lookup`.
The interface is ready for it. The extension provides only the scan of certify.py, called with
keywords like the other ops' kernels (pointers, sizes, strides in elements, a dtype code from
DTYPE_CODES, the device index and the current stream's handle):

    _C.codebook_lookup_scan(z=, e=, alpha=, beta=, best=, second=, index=, n=, k=, d=, stride_z=,
                            stride_e=, dtype=, device=, stream=)

z (N, D) and e (K, D) with unit feature stride, one dtype (float16, bfloat16, float32); alpha, beta
(K,) fp32; it writes best, second (N,) fp32 and index (N,) int32: the smallest score
alpha_j <z_i, e_j> + beta_j, its lowest index, and the smallest score of every other code.
certify.lookup turns that into the exact result given DOT_ERROR(dtype, D), the relative error bound
of the kernel's dot products, which the kernel's author states (the Triton scan's model is
certify.dot_error: fp32 accumulation erring by at most 4 units of 2^-24 per added term).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._backends import cuda_why_not, extension
from ..._dispatch import ImplUnavailableError
from . import certify, reference

DOT_ERROR = certify.dot_error  # replace with the CUDA kernel's own bound when it lands


def why_not(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA kernels can run inputs of this device and dtype, else the reason."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the CUDA kernels take float16, bfloat16 and float32, not {dtype}; float64 runs on impl='reference'"
    return cuda_why_not("codebook_lookup", device)


def scan(z: Tensor, e: Tensor, alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    ext = extension()[0]
    n = z.shape[0]
    best = torch.empty(n, dtype=torch.float32, device=z.device)
    second = torch.empty_like(best)
    index = torch.empty(n, dtype=torch.int32, device=z.device)
    ext.codebook_lookup_scan(z=z.data_ptr(), e=e.data_ptr(), alpha=alpha.data_ptr(), beta=beta.data_ptr(),
                             best=best.data_ptr(), second=second.data_ptr(), index=index.data_ptr(), n=n,
                             k=e.shape[0], d=z.shape[1], stride_z=z.stride(0), stride_e=e.stride(0),
                             dtype=ext.DTYPE_CODES[str(z.dtype).removeprefix("torch.")], device=z.device.index,
                             stream=torch.cuda.current_stream(z.device).cuda_stream)
    return best, second, index


def lookup(z: Tensor, e: Tensor, metric: str) -> tuple[Tensor, Tensor]:
    reason = why_not(z.device, z.dtype)
    if reason is not None:
        raise ImplUnavailableError(f"vlfast.codebook_lookup: impl='cuda' cannot run here: {reason}")
    index, dist, _ = certify.lookup(z, e, metric, scan, reference.chosen_distances, DOT_ERROR(z.dtype, z.shape[1]))
    return index, dist
