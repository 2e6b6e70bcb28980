"""NVTX ranges under the "vlfast" domain, on when VLFAST_NVTX=1 (read once, at import).

Off, `nvtx_range` returns one shared null context: no allocation, no call into NVTX.
"""
from __future__ import annotations

import contextlib

from . import _env

ENABLED = _env.flag("VLFAST_NVTX")
_NULL = contextlib.nullcontext()


def _make_annotate():
    if not ENABLED:
        return None
    try:
        import nvtx  # the NVIDIA package: supports domains
        return lambda name: nvtx.annotate(name, domain="vlfast")
    except ImportError:
        import torch  # no domain support there: prefix the name instead

        @contextlib.contextmanager
        def annotate(name):
            torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        return annotate


_annotate = _make_annotate()


def nvtx_range(name: str):
    """Context manager: an NVTX range called `name` (e.g. "vlfast.clip_loss.fwd") when enabled."""
    return _annotate(name) if _annotate is not None else _NULL
