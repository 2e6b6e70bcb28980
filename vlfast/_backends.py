"""Whether the Triton kernels and the CUDA extension can run, and if not, why.

Probed once at import (cheaply: triton is located, not imported) so that dispatch code traced by
torch.compile reads constants.
"""
from __future__ import annotations

import importlib.util
import json
import os
from typing import Callable, Optional

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


BUILD_STATUS_FILE = "_build_cuda.json"  # written next to vlfast/_C*.so by setup.py's build step


def _not_built_reason(status: Optional[str] = None) -> str:
    """Why vlfast._C is absent: what setup.py recorded at install time, when it recorded anything."""
    status = status or os.path.join(os.path.dirname(os.path.abspath(__file__)), BUILD_STATUS_FILE)
    try:
        with open(status) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        recorded = {}
    if recorded.get("reason"):
        return f"the CUDA extension vlfast._C is not built: {recorded['reason']}"
    return ("the CUDA extension vlfast._C is not built "
            "(build it with VLFAST_BUILD_CUDA=1 pip install -e . on a machine with nvcc)")


def _load_extension():
    if importlib.util.find_spec("vlfast._C") is None:
        return None, _not_built_reason()
    try:
        from vlfast import _C  # type: ignore[attr-defined]
    except ImportError as e:  # built, but does not load (e.g. built for another Python)
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
    ops = getattr(_EXTENSION, "OPS", ())
    if op not in ops:
        return f"vlfast._C has no {op} kernels (it has: {', '.join(ops) or 'none'})"
    if device.type != "cuda":
        return f"the inputs are on {device.type}; vlfast._C's kernels need CUDA tensors"
    return None


FLOAT64_ON_REFERENCE = "the Triton kernels take float16, bfloat16 and float32; float64 runs on impl='reference'"


def triton_why_not_for(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """triton_why_not, plus the dtypes every op's Triton kernels take."""
    return FLOAT64_ON_REFERENCE if dtype == torch.float64 else triton_why_not(device)


def availability(triton_check: Callable[[], Optional[str]],
                 cuda_check: Callable[[], Optional[str]]) -> dict:
    """impl -> check returning None if it can run, else the reason (reference and torch always run)."""
    return {"reference": lambda: None, "torch": lambda: None, "triton": triton_check, "cuda": cuda_check}


def status(checks: dict) -> dict:
    """{impl: None or the reason}: the checks evaluated (what `vlfast info` prints)."""
    return {name: check() for name, check in checks.items()}


def cuda_why_not_for(op: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """cuda_why_not, plus the dtypes every CUDA kernel takes."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the CUDA kernels take float16, bfloat16 and float32, not {dtype}; float64 runs on impl='reference'"
    return cuda_why_not(op, device)


def cuda_extension_for(op: str, device: torch.device, dtype: torch.dtype):
    """vlfast._C when it can run `op` on inputs like these, else ImplUnavailableError with the reason."""
    from ._dispatch import ImplUnavailableError
    reason = cuda_why_not_for(op, device, dtype)
    if reason is not None:
        raise ImplUnavailableError(f"vlfast.{op}: impl='cuda' cannot run here: {reason}")
    return _EXTENSION


def sm_count(device: torch.device) -> int:
    """Multiprocessors to fill (4 off a GPU: the interpreter still exercises several programs)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
