"""Whether the Triton kernels and the CUDA extension can run, and if not, why.

Probed once at import (cheaply: triton is located, not imported) so that dispatch code traced by
torch.compile reads constants.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_why_not(device: torch.device) -> Optional[str]:
    """None when Triton kernels can run on `device`, else the reason."""
    if not _TRITON_FOUND:
        return "triton is not installed (pip install triton; Linux only)"
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "vlfast's Triton kernels are tuned and tested on NVIDIA GPUs only"
        return None
    if triton_interpreting():
        return None
    return (f"the inputs are on {device.type}; Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1, set before triton is imported, to run them in the interpreter)")


def _load_extension():
    if importlib.util.find_spec("vlfast._C") is None:
        return None, ("the CUDA extension vlfast._C is not built "
                      "(build it with VLFAST_BUILD_CUDA=1 pip install -e . on a machine with nvcc)")
    try:
        from vlfast import _C  # type: ignore[attr-defined]
    except ImportError as e:  # built, but does not load (e.g. a CUDA runtime mismatch)
        return None, f"the CUDA extension vlfast._C is built but does not import: {e}"
    return _C, None


_EXTENSION, _EXTENSION_ERROR = _load_extension()


def extension():
    """The compiled module vlfast._C and None, or None and why it is missing."""
    return _EXTENSION, _EXTENSION_ERROR


def cuda_why_not(op: str, device: torch.device) -> Optional[str]:
    """None when vlfast._C has kernels for `op` and the inputs are CUDA tensors, else the reason."""
    if _EXTENSION is None:
        return _EXTENSION_ERROR
    if not hasattr(_EXTENSION, f"{op}_forward"):
        return f"vlfast._C was built without {op} kernels"
    if device.type != "cuda":
        return f"the inputs are on {device.type}; the CUDA kernels need CUDA tensors"
    return None
