"""Scratch buffers kept per thread between calls, for the CPU paths' chunked loops.

Allocating and freeing a chunk of several MiB on every call lets the C library hand its pages back to
the system and fault them in again on the next call: ~1 us a 4 KiB page here, so ~4 ms for a 16 MiB
score chunk, about twice the GEMM that fills it (measured: codebook lookup 4096 x 1024 x 64, 4700 page
faults a call; clip_loss backward 2048 x 2048, ~5000). Each named buffer holds at most one chunk, so
the memory kept is bounded by the ops' chunk sizes; a buffer never leaves the op that asked for it.
"""
from __future__ import annotations

import threading

import torch

_held = threading.local()


def buffer(name: str, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A 1-D tensor of at least `numel` elements (the first `numel` returned), uninitialised, reused by
    the next call with the same name on this thread: the caller must be done with it before then."""
    held = getattr(_held, name, None)
    if held is None or held.numel() < numel or held.dtype != dtype or held.device != torch.device(device):
        held = torch.empty(numel, dtype=dtype, device=device)
        setattr(_held, name, held)
    return held[:numel]


def matrix(name: str, rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """buffer(name, ...) as a (rows, cols) matrix."""
    return buffer(name, rows * cols, dtype, device).view(rows, cols)
