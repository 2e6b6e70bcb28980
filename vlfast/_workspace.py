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


def _use_count(storage) -> int:
    """References to storage's memory (tensors, views, autograd's saved tensors, Python storage objects);
    0 where this torch cannot tell (a private function: then nothing is reused)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return count(storage._cdata) if count is not None else 0


def storage(name: str, nbytes: int, device) -> torch.UntypedStorage:
    """An uninitialised storage of exactly `nbytes` for tensors that outlive the call (autograd saves
    them for the backward): the one the last call with this name made on this thread, once nothing else
    holds it (its graph freed), else a fresh one that later calls may reuse. A training loop's next step
    then skips the page faults of a fresh chunk (4096 a call for clip_loss's kept 16 MiB)."""
    key = f"storage.{name}"
    held = getattr(_held, key, None)
    if held is not None and held.nbytes() == nbytes and held.device == torch.device(device) \
            and _use_count(held) == 1:  # only this reference: no tensor uses it any more
        return held
    held = torch.empty(nbytes, dtype=torch.uint8, device=device).untyped_storage()
    setattr(_held, key, held)
    return held
