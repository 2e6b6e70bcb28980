"""Top k over keys taken a block of rows at a time, merged exactly: for keys that do not fit on the queries'
device (keys in host memory, queries on a GPU) or that should not be scored all at once.

Each block's exact top k (indices shifted to the whole key set, float64 scores: a pair's score has the
same bits whichever block it is scored in) is merged into the running top k by score, then index, so the
result is the top k of all keys, ties to the lower index. Host keys travel to the GPU through pinned
memory on a side stream, the next block's copy overlapping the current block's search.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

STREAM_BLOCK_BYTES = 1 << 28  # keys per block when streaming from the host: 256 MiB of them


def default_block(keys: Tensor, k: int) -> int:
    """Rows per block: 256 MiB of keys, and at least k."""
    per_row = max(1, keys.shape[1] * keys.element_size())
    return max(k, STREAM_BLOCK_BYTES // per_row)


def merge(best: tuple[Tensor, Tensor], new: tuple[Tensor, Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The top k of two (N, *) candidate sets (indices int64, float64 scores): by score, then index."""
    index, score = torch.cat([best[0], new[0]], dim=1), torch.cat([best[1], new[1]], dim=1)
    by_index = torch.sort(index, dim=1, stable=True).indices
    index, score = index.gather(1, by_index), score.gather(1, by_index)
    by_score = torch.sort(-score, dim=1, stable=True).indices[:, :k]  # equal scores keep index order
    return index.gather(1, by_score), score.gather(1, by_score)


def _blocks(keys: Tensor, block: int, device: torch.device) -> Iterator[tuple[int, Tensor]]:
    """(first row, the block on `device`); host blocks copied one ahead on a side stream."""
    if keys.device == device:
        for k0 in range(0, keys.shape[0], block):
            yield k0, keys[k0:k0 + block]
        return
    copy_stream = torch.cuda.Stream(device)

    def fetch(k0: int):
        host = keys[k0:k0 + block]
        host = host if host.is_pinned() else host.pin_memory()
        with torch.cuda.stream(copy_stream):
            on_device = host.to(device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(copy_stream)
        return k0, on_device, done, host  # host: kept alive until its copy is done

    pending = fetch(0)
    while pending is not None:
        k0, on_device, done, _host = pending
        compute = torch.cuda.current_stream(device)
        compute.wait_event(done)
        on_device.record_stream(compute)  # its memory is not reused before the search has read it
        pending = fetch(k0 + block) if k0 + block < keys.shape[0] else None
        yield k0, on_device


def streamed_topk(search: Callable[[Tensor, Tensor, int, str], tuple[Tensor, Tensor]], q: Tensor, keys: Tensor,
                  k: int, metric: str, block: int) -> tuple[Tensor, Tensor]:
    """(indices (N, k) int64, scores (N, k) float64): search (an implementation's exact top k with float64
    scores) over each block of `block` key rows, merged."""
    best = None
    for k0, chunk in _blocks(keys, block, q.device):
        index, score = search(q, chunk, min(k, chunk.shape[0]), metric)
        found = (index + k0, score)
        best = found if best is None else merge(best, found, k)
    return best
