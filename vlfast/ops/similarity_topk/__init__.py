"""vlfast.similarity_topk: the exact top-k of query-key similarities, for retrieval, without an N x M matrix.

reference.py states the definition (float64 scores, ties to the lower index); torch_impl.py is the
certified float32 filter with float64 re-scoring (the CPU path); streaming.py takes the keys a block at a
time (from host memory to a GPU, overlapped) and merges the blocks exactly. GPU kernels are not written yet.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ..._backends import availability, status
from ..._dispatch import resolve_impl
from . import reference as _reference
from . import streaming as _streaming
from . import torch_impl as _torch_impl
from .reference import METRICS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_IMPLS = {"reference": _reference.similarity_topk, "torch": _torch_impl.similarity_topk}


def _fail(message: str, exc=ValueError):
    raise exc(f"vlfast.similarity_topk: {message}")


def _check(queries, keys, k, metric, key_block) -> None:
    for name, x in (("queries", queries), ("keys", keys)):
        if not isinstance(x, Tensor) or x.dim() != 2:
            _fail(f"{name} must be a 2-D tensor ({'N' if name == 'queries' else 'M'}, D), got "
                  f"{tuple(getattr(x, 'shape', ())) if isinstance(x, Tensor) else type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            _fail(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}", TypeError)
    if queries.shape[1] != keys.shape[1] or keys.shape[1] == 0:
        _fail(f"queries and keys must share a non-zero feature dimension, got {queries.shape[1]} and {keys.shape[1]}")
    streamed = keys.device.type == "cpu" and queries.device.type == "cuda"  # host keys, GPU queries
    if queries.dtype != keys.dtype or (queries.device != keys.device and not streamed):
        _fail(f"queries and keys must share a dtype and a device (or keys in host memory for queries on a GPU), "
              f"got {queries.dtype} on {queries.device} and {keys.dtype} on {keys.device}", TypeError)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= keys.shape[0]:
        _fail(f"k must be an int in [1, M={keys.shape[0]}], got {k!r}")
    if metric not in METRICS:
        _fail(f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(key_block, bool) or not isinstance(key_block, int) or key_block < 0:
        _fail(f"key_block must be an int >= 0 (0: the default), got {key_block!r}")
    for name, x in (("queries", queries), ("keys", keys)):
        if x.numel() and not bool(torch.isfinite(x.abs().amax())):  # one host sync
            _fail(f"{name} must be finite (no inf or NaN)")


def _why_not(device: torch.device) -> dict:
    return availability(lambda: "similarity_topk has no Triton kernel yet", lambda: "similarity_topk has no CUDA kernel yet")


def implementation_status(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16) -> dict:
    """{impl: None if it can run inputs on `device`, else the reason} (for `vlfast info`)."""
    return status(_why_not(torch.device(device)))


@torch.no_grad()
def similarity_topk(queries: Tensor, keys: Tensor, k: int, *, metric: str = "ip", key_block: int = 0,
                    impl: str = "auto") -> tuple[Tensor, Tensor]:
    """The k keys (M, D) most similar to each query (N, D): (indices (N, k) int64, scores (N, k) float32).

    Exactly the top k of the float64 scores of reference.py (metric "ip", "cosine" or "l2" = minus the
    squared distance), in decreasing score, ties to the lower index, whatever the input dtype; any k
    from 1 to M. No gradients. Keys may stay in host memory for queries on a GPU: they are streamed in
    blocks (pinned, the next block's copy overlapping the current search), so M is not bounded by GPU
    memory. key_block: rows of keys per block, merged exactly (0: all at once, or 256 MiB blocks when
    streaming). impl: "auto" | "reference" | "torch".
    """
    _check(queries, keys, k, metric, key_block)
    impl = resolve_impl("similarity_topk", impl, queries.device, _why_not(queries.device))
    if queries.shape[0] == 0:
        return (torch.empty(0, k, dtype=torch.int64, device=queries.device),
                torch.empty(0, k, dtype=torch.float32, device=queries.device))
    search = _IMPLS[impl]
    if key_block == 0 and keys.device == queries.device:
        index, score = search(queries, keys, k, metric)
    else:
        block = key_block or _streaming.default_block(keys, k)
        index, score = _streaming.streamed_topk(search, queries, keys, k, metric, block)
    return index, score.float()
