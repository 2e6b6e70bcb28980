"""MaskCache: values derived from a mask and shapes (plans, block maps, dense biases), kept for the next
call with the same mask. A model passes one mask object to all its layers (and the backward), so the
derivation runs once per forward instead of once per layer.

The key is the mask's contents: its flags, and for each per-token tensor its id, shape, version (in-place
writes bump it) and device. A hit also checks, by weak reference, that the tensors are the very ones the
entry was built from: a new tensor allocated at a dead one's id must not get the dead one's value.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional, TypeVar

from torch import Tensor

from ..masks import Mask

T = TypeVar("T")


def tensor_key(t: Optional[Tensor]):
    return None if t is None else (id(t), tuple(t.shape), t._version, str(t.device))


class MaskCache:
    """get(mask, extra, compute) -> compute()'s value for this mask's contents and `extra` (shapes, dtype,
    device), computed on a miss; the oldest of `limit` entries goes first."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._entries: dict = {}

    def get(self, mask: Mask, extra: tuple, compute: Callable[[], T]) -> T:
        tensors = [t for t in (mask.span_ids, mask.key_valid) if t is not None]
        key = (mask.causal, mask.window, mask.dalle, tensor_key(mask.span_ids), tensor_key(mask.key_valid)) + extra
        hit = self._entries.get(key)
        if hit is not None and all(ref() is t for ref, t in zip(hit[0], tensors)):
            return hit[1]
        value = compute()
        if len(self._entries) >= self.limit:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = ([weakref.ref(t) for t in tensors], value)
        return value

    def clear(self) -> None:
        self._entries.clear()
