"""Whether the Triton kernels and the CUDA extension can run, and if not, why."""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"triton does not import ({type(e).__name__}: {e})"
    return None


def triton_why_not(device: torch.device) -> Optional[str]:
    """None when Triton kernels can run on `device`, else the reason."""
    err = triton_import_error()
    if err:
        return err
    if device.type == "cuda":
        if torch.version.hip is not None:
            return "vlfast's Triton kernels are tuned and tested on NVIDIA GPUs only"
        return None
    if triton_interpreting():
        return None
    return (f"the inputs are on {device.type}; Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1, set before triton is imported, to run them in the interpreter)")


@lru_cache(maxsize=None)
def extension():
    """The compiled module vlfast._C and None, or None and why it is missing."""
    try:
        from vlfast import _C  # type: ignore[attr-defined]
    except ImportError as e:
        return None, (f"the CUDA extension vlfast._C is not built ({e}); "
                      "build it with VLFAST_BUILD_CUDA=1 pip install -e . on a machine with nvcc")
    return _C, None


def cuda_why_not(op: str, device: torch.device) -> Optional[str]:
    """None when vlfast._C has kernels for `op` and the inputs are CUDA tensors, else the reason."""
    ext, err = extension()
    if ext is None:
        return err
    if not hasattr(ext, f"{op}_forward"):
        return f"vlfast._C was built without {op} kernels"
    if device.type != "cuda":
        return f"the inputs are on {device.type}; the CUDA kernels need CUDA tensors"
    return None
