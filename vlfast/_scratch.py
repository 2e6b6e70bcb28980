"""Allocation of kernel outputs and scratch buffers.

With VLFAST_POISON=1 (read at each call; tests set it) buffers start as NaN instead of
uninitialised memory, so an element a kernel forgot to write shows up as a NaN in the result.
"""
from __future__ import annotations

import torch

from . import _env


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if _env.flag("VLFAST_POISON") and out.is_floating_point():
        out.fill_(float("nan"))
    return out
