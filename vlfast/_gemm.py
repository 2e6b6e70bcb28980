"""Matrix products with float32 results for any floating inputs, through PyTorch (cuBLAS on a GPU).

Half-precision inputs use PyTorch's out_dtype overloads on CUDA (fp32 accumulation and output, no
rounding to the input dtype); elsewhere the inputs are upcast. Whether this torch build accepts the
in-place form `addmm(..., out_dtype=float32, out=acc)` is probed once on first use.
"""
from __future__ import annotations

import torch
from torch import Tensor

_ADDMM_INTO: dict = {}


def mm_f32(x: Tensor, y: Tensor) -> Tensor:
    """x @ y as float32 (float64 stays float64)."""
    if x.dtype in (torch.float32, torch.float64):
        return x @ y
    if x.is_cuda:
        return torch.mm(x, y, out_dtype=torch.float32)
    return x.float() @ y.float()


def _addmm_into_works(device: torch.device) -> bool:
    if device not in _ADDMM_INTO:
        try:
            acc = torch.ones(2, 2, device=device)
            x = torch.ones(2, 3, device=device, dtype=torch.bfloat16)
            torch.addmm(acc, x, x.T, out_dtype=torch.float32, out=acc)
            _ADDMM_INTO[device] = bool((acc == 4).all())
        except (RuntimeError, TypeError):
            _ADDMM_INTO[device] = False
    return _ADDMM_INTO[device]


def addmm_f32_(acc: Tensor, x: Tensor, y: Tensor) -> None:
    """acc (float32 or float64) += x @ y, accumulated and rounded once in acc's precision."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, y)
    elif x.is_cuda and _addmm_into_works(x.device):
        torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
    else:
        acc += mm_f32(x, y)
