"""vlfast.codebook_lookup: exact nearest-code search for VQ tokenizers, without an N x K distance matrix.

The public function validates, picks an implementation, and calls one torch.library op
(vlfast::codebook_lookup), so torch.compile sees a single opaque boundary. reference.py states the
definition; certify.py how a low-precision scan still gives the exact argmin.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ..._backends import availability, status, triton_why_not_for
from ..._dispatch import op_bodies_may_run_directly as _eager, resolve_impl
from ..._nvtx import nvtx_range
from . import cuda as _cuda
from . import reference as _reference
from . import torch_impl as _torch_impl
from .reference import METRICS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_lookup(*args):
    from . import triton  # imported on first use: vlfast imports where triton does not
    return triton.lookup(*args)


_FORWARD = {"reference": _reference.lookup, "torch": _torch_impl.lookup, "triton": _triton_lookup, "cuda": _cuda.lookup}


def _unit_feature_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _forward_body(z: Tensor, codebook: Tensor, metric: str, impl: str) -> tuple[Tensor, Tensor]:
    """What vlfast::codebook_lookup runs (see codebook_lookup_forward)."""
    if z.shape[0] == 0:
        return z.new_empty(0, dtype=torch.int64), z.new_empty(0, dtype=torch.float32)
    with nvtx_range("vlfast.codebook_lookup.fwd"):
        return _FORWARD[impl](_unit_feature_stride(z), _unit_feature_stride(codebook), metric)


@torch.library.custom_op("vlfast::codebook_lookup", mutates_args=())
def codebook_lookup_forward(z: Tensor, codebook: Tensor, metric: str, impl: str) -> tuple[Tensor, Tensor]:
    """(indices (N,) int64, distances (N,) float32) for z (N, D) against codebook (K, D)."""
    return _forward_body(z, codebook, metric, impl)


@codebook_lookup_forward.register_fake
def _(z, codebook, metric, impl):
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


def _check_inputs(z, codebook, metric: str) -> None:
    for name, x, shape in (("z", z, "(..., D)"), ("codebook", codebook, "(K, D)")):
        if not isinstance(x, Tensor):
            raise TypeError(f"vlfast.codebook_lookup: {name} must be a tensor {shape}, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"vlfast.codebook_lookup: {name} must be float16, bfloat16, float32 or float64, "
                            f"got {x.dtype}")
    if z.dim() < 1:
        raise ValueError("vlfast.codebook_lookup: z must have a feature dimension, shape (..., D); got a scalar")
    if codebook.dim() != 2:
        raise ValueError(f"vlfast.codebook_lookup: codebook must be 2-D (K, D), got shape {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError("vlfast.codebook_lookup: codebook is empty (K = 0); it needs at least one code")
    if codebook.shape[1] == 0:
        raise ValueError("vlfast.codebook_lookup: codebook has feature dimension D = 0")
    if z.shape[-1] != codebook.shape[1]:
        raise ValueError(f"vlfast.codebook_lookup: feature dimensions differ: z {tuple(z.shape)} ends in "
                         f"{z.shape[-1]}, codebook {tuple(codebook.shape)} has D = {codebook.shape[1]}")
    if z.dtype != codebook.dtype:
        raise TypeError(f"vlfast.codebook_lookup: z is {z.dtype} but codebook is {codebook.dtype}; cast one "
                        "so both share a dtype (casting to the wider one keeps the values exact)")
    if z.device != codebook.device:
        raise ValueError(f"vlfast.codebook_lookup: z is on {z.device} but codebook is on {codebook.device}")
    if metric not in METRICS:
        raise ValueError(f"vlfast.codebook_lookup: metric must be one of {METRICS}, got {metric!r}")


def _why_not(device: torch.device, dtype: torch.dtype) -> dict:
    """impl -> check returning None if it runs inputs of this device and dtype, else why not."""
    return availability(lambda: triton_why_not_for(device, dtype), lambda: _cuda.why_not(device, dtype))


def implementation_status(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16) -> dict:
    """{impl: None if it can run inputs on `device` of `dtype`, else the reason} (for `vlfast info`)."""
    return status(_why_not(torch.device(device), dtype))


def codebook_lookup(z: Tensor, codebook: Tensor, *, metric: str = "l2", impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Nearest code of every row of z (..., D) in codebook (K, D): (indices, distances), both z.shape[:-1].

    indices (int64) are exactly the float64 argmin of the definition in reference.py (ties to the lowest
    index, as torch.argmin), whatever the input dtype: low-precision tensor-core scores only filter.
    metric="l2": distance = ||z - e||^2. metric="cosine": the code of largest cosine similarity, distance
    = 1 - cos (a zero vector has cosine 0 with every code, so a zero row picks code 0).
    distances are float32, computed in float64 from the chosen code. Neither output carries a gradient.
    z and codebook: one dtype (float16, bfloat16, float32; float64 on impl="reference"), one device, any
    strides. Non-finite values raise ValueError. impl: "auto" | "reference" | "torch" | "triton" | "cuda"; an
    explicit choice raises if it cannot run.
    """
    _check_inputs(z, codebook, metric)
    impl = resolve_impl("codebook_lookup", impl, z.device, lambda: _why_not(z.device, z.dtype))
    lead = z.shape[:-1]
    z, codebook = z.detach().reshape(-1, z.shape[-1]), codebook.detach()
    # plain eager calls skip the op boundary (vlfast._dispatch.op_bodies_may_run_directly)
    index, dist = (_forward_body if _eager(z, codebook) else codebook_lookup_forward)(z, codebook, metric, impl)
    return index.reshape(lead), dist.reshape(lead)
