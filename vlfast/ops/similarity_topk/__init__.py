"""vlfast.similarity_topk: the exact top-k of query-key similarities, for retrieval, without an N x M matrix.

reference.py states the definition (float64 scores, ties to the lower index); torch_impl.py is the
certified float32 filter with float64 re-scoring (the CPU path); filter.py is the GPU kernels' algorithm
(a tensor-core pass emits the keys near each row's top, certified, then float64 scores for those), whose
emit step triton.py and cuda.py implement; streaming.py takes the keys a block at a time (from host
memory to a GPU, overlapped) and merges the blocks exactly.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from ..._backends import availability, status, triton_why_not_for
from ..._dispatch import resolve_impl
from . import cuda as _cuda
from . import reference as _reference
from . import streaming as _streaming
from . import torch_impl as _torch_impl
from .reference import METRICS

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_topk(*args):
    from . import triton  # imported on first use: vlfast imports where triton does not
    return triton.similarity_topk(*args)


def _unit_feature_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


_IMPLS = {"reference": _reference.similarity_topk, "torch": _torch_impl.similarity_topk, "triton": _triton_topk,
          "cuda": _cuda.similarity_topk}


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


def _why_not(device: torch.device, dtype: torch.dtype) -> dict:
    return availability(lambda: triton_why_not_for(device, dtype), lambda: _cuda.why_not(device, dtype))


def implementation_status(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16) -> dict:
    """{impl: None if it can run inputs on `device` of `dtype`, else the reason} (for `vlfast info`)."""
    return status(_why_not(torch.device(device), dtype))


@torch.no_grad()
def similarity_topk(queries: Tensor, keys: Tensor, k: int, *, metric: str = "ip", key_block: int = 0,
                    impl: str = "auto") -> tuple[Tensor, Tensor]:
    """The k keys (M, D) most similar to each query (N, D): (indices (N, k) int64, scores (N, k) float32).

    Exactly the top k of the float64 scores of reference.py (metric "ip", "cosine" or "l2" = minus the
    squared distance), in decreasing score, ties to the lower index, whatever the input dtype; any k
    from 1 to M. No gradients. Keys may stay in host memory for queries on a GPU: they are streamed in
    blocks (pinned, the next block's copy overlapping the current search), so M is not bounded by GPU
    memory. key_block: rows of keys per block, merged exactly (0: all at once, or 256 MiB blocks when
    streaming). impl: "auto" | "reference" | "torch" | "triton" | "cuda" (the kernels take float16,
    bfloat16 and float32 on a GPU); an explicit choice raises if it cannot run.
    """
    _check(queries, keys, k, metric, key_block)
    impl = resolve_impl("similarity_topk", impl, queries.device, lambda: _why_not(queries.device, queries.dtype))
    queries, keys = _unit_feature_stride(queries), _unit_feature_stride(keys)
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
