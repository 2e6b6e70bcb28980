"""Matrix products with float32 results for any floating inputs, through PyTorch (cuBLAS on a GPU).

Half-precision inputs use PyTorch's out_dtype overloads on CUDA (fp32 accumulation and output, no
rounding to the input dtype); elsewhere the inputs are upcast. Whether this torch build accepts the
forms that write into an existing buffer (`mm(..., out_dtype=float32, out=buf)`,
`addmm(..., out_dtype=float32, out=acc)`) is probed once per device on first use.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import _env

_WRITES_INTO: dict = {}  # (device, "mm" | "addmm") -> bool
CPU_FP32_GEMMS = ("blas", "onednn")


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


def _cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("GenuineIntel", "AuthenticAMD", ...), or "" where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def onednn_available() -> bool:
    """This torch build can run oneDNN's float32 inner product on a CPU (mkldnn::_linear_pointwise)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.lru_cache(maxsize=None)
def _default_cpu_fp32_gemm() -> str:
    # torch.mm's float32 BLAS is MKL on x86 builds, which runs AVX2 code on CPUs not made by Intel, while
    # oneDNN's float32 inner product uses AVX-512 where the CPU has it: on an AMD Zen 5 pair, 2048 x 1024 x 64
    # took 0.65 ms against 1.23 and 1024 x 4096 x 256 4.9 against 10.5. On Intel CPUs MKL stays.
    return "onednn" if onednn_available() and _cpu_vendor() == "AuthenticAMD" else "blas"


def cpu_fp32_gemm() -> str:
    """Which library runs linear_f32's float32 products on a CPU: "onednn" or "blas" (torch.mm).
    VLFAST_CPU_FP32_GEMM=blas|onednn overrides the choice made from the CPU's vendor; "onednn" raises
    where this torch build has no oneDNN."""
    chosen = _env.choice("VLFAST_CPU_FP32_GEMM", CPU_FP32_GEMMS, "")
    if chosen == "onednn" and not onednn_available():
        raise RuntimeError("VLFAST_CPU_FP32_GEMM=onednn, but this torch build has no oneDNN float32 inner "
                           "product (torch.backends.mkldnn.is_available() or mkldnn::_linear_pointwise missing)")
    return chosen or _default_cpu_fp32_gemm()


def linear_f32(x: Tensor, w: Tensor, bias: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """x (M, D) @ w (N, D)^T (+ bias (N,)), float32 in and out, any strides, no autograd: IEEE float32
    arithmetic where ieee_fp32_gemms (in any order of summation; bias is one more term). On a CPU with
    cpu_fp32_gemm() == "onednn", oneDNN's inner product into a fresh (M, N) (it takes no out);
    otherwise torch.mm / addmm, into out when given."""
    if x.device.type == "cpu" and cpu_fp32_gemm() == "onednn":
        return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")
    if bias is None:
        return torch.mm(x, w.T, out=out)
    return torch.addmm(bias, x, w.T, out=out)


def add_linear_f32_(acc: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """acc (M, N) float32 += x (M, D) @ w (N, D)^T, as linear_f32: torch's addmm_ in place with the BLAS,
    the product (fresh) added with oneDNN."""
    if x.device.type == "cpu" and cpu_fp32_gemm() == "onednn":
        return acc.add_(linear_f32(x, w))
    return acc.addmm_(x, w.T)


def mm(x: Tensor, y: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """x @ y as torch.mm (into out), but float32 products through linear_f32: oneDNN's where it beats the
    BLAS, into a fresh tensor then."""
    if x.dtype != torch.float32:
        return torch.mm(x, y, out=out)
    return linear_f32(x, y.T, out=out)
