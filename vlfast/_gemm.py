"""Matrix products with float32 results for any floating inputs, through PyTorch (cuBLAS on a GPU).

Half-precision inputs use PyTorch's out_dtype overloads on CUDA (fp32 accumulation and output, no
rounding to the input dtype); elsewhere the inputs are upcast. Whether this torch build accepts the
forms that write into an existing buffer (`mm(..., out_dtype=float32, out=buf)`,
`addmm(..., out_dtype=float32, out=acc)`) is probed once per device on first use.
"""
from __future__ import annotations

import torch
from torch import Tensor

_WRITES_INTO: dict = {}  # (device, "mm" | "addmm") -> bool


def mm_f32(x: Tensor, y: Tensor) -> Tensor:
    """x @ y as float32 (float64 stays float64)."""
    if x.dtype in (torch.float32, torch.float64):
        return x @ y
    if x.is_cuda:
        return torch.mm(x, y, out_dtype=torch.float32)
    return x.float() @ y.float()


def _writes_into(device: torch.device, form: str) -> bool:
    key = (device, form)
    if key not in _WRITES_INTO:
        try:
            acc = torch.ones(2, 2, device=device)
            x = torch.ones(2, 3, device=device, dtype=torch.bfloat16)
            if form == "mm":
                torch.mm(x, x.T, out_dtype=torch.float32, out=acc)
                _WRITES_INTO[key] = bool((acc == 3).all())
            else:
                torch.addmm(acc, x, x.T, out_dtype=torch.float32, out=acc)
                _WRITES_INTO[key] = bool((acc == 4).all())
        except (RuntimeError, TypeError):
            _WRITES_INTO[key] = False
    return _WRITES_INTO[key]


def mm_f32_into(out: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """out (float32; float64 for float64 inputs) = x @ y, with no temporary of out's size on CUDA."""
    if x.dtype == out.dtype:
        return torch.mm(x, y, out=out)
    if x.is_cuda and _writes_into(x.device, "mm"):
        return torch.mm(x, y, out_dtype=torch.float32, out=out)
    return out.copy_(mm_f32(x, y))


def addmm_f32_(acc: Tensor, x: Tensor, y: Tensor) -> None:
    """acc (float32 or float64) += x @ y, accumulated and rounded once in acc's precision."""
    if x.dtype == acc.dtype:
        acc.addmm_(x, y)
    elif x.is_cuda and _writes_into(x.device, "addmm"):
        torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
    else:
        acc += mm_f32(x, y)


def ieee_fp32_gemms(device: torch.device) -> bool:
    """True when PyTorch runs float32 matrix products on `device` in IEEE float32, as the certified paths'
    error bounds assume; False where a setting lets it drop precision (TF32, oneDNN's bf16 / tf32 modes:
    torch.backends.<backend>.matmul.fp32_precision, or torch.set_float32_matmul_precision, which sets
    it). The backend's own setting is read where this torch has it: the legacy getter raises once the
    new API has been used."""
    backend = torch.backends.cuda if device.type == "cuda" else getattr(torch.backends, "mkldnn", None)
    precision = getattr(getattr(backend, "matmul", None), "fp32_precision", None)
    if precision is not None:
        return precision in ("none", "ieee")
    return torch.get_float32_matmul_precision() == "highest"
