"""Reading VLFAST_* environment variables, with an error that names the variable when it is malformed.

Unset or empty means the default. Every VLFAST_* read in the package goes through here, so a typo
such as VLFAST_NVTX=yes or VLFAST_LCE_CHUNK_BYTES=32MiB fails loudly instead of being ignored.
"""
from __future__ import annotations

import functools
import os
from typing import Optional


@functools.lru_cache(maxsize=None)
def _encoded(name: str):
    return os.environ.encodekey(name)


def _raw(name: str) -> str:
    # Ops read VLFAST_IMPL on every call, where it is usually unset, and os.environ.get answers an unset
    # name by raising and catching KeyError twice: ~1 us, several when caches are cold after a kernel.
    # CPython's os.environ keeps the encoded mapping it reads in _data: ask it first (where it exists).
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict) and hasattr(os.environ, "encodekey") and _encoded(name) not in data:
        return ""
    return os.environ.get(name, "").strip()


def flag(name: str, default: bool = False) -> bool:
    """A 0 / 1 switch."""
    value = _raw(name)
    if value == "":
        return default
    if value not in ("0", "1"):
        raise ValueError(f"environment variable {name} must be 0 or 1, got {value!r}")
    return value == "1"


def positive_int(name: str, default: Optional[int]) -> Optional[int]:
    """An integer >= 1 (written in decimal digits)."""
    value = _raw(name)
    if value == "":
        return default
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {value!r}")
    return int(value)


def choice(name: str, choices: tuple, default: str) -> str:
    """One of `choices`."""
    value = _raw(name)
    if value == "":
        return default
    if value not in choices:
        raise ValueError(f"environment variable {name} must be one of {choices}, got {value!r}")
    return value
