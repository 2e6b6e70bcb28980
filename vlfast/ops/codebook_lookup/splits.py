"""How a scan divides the codebook among programs, and how the per-split results merge; shared by
the Triton and CUDA scans, whose (splits, N) outputs have the same layout."""
from __future__ import annotations

import torch
from torch import Tensor

from ..._backends import sm_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def plan(row_blocks: int, k: int, device: torch.device, step: int) -> tuple[int, int]:
    """(splits, codes per split): enough splits that the grid fills the GPU about four times over
    when N is small, each a multiple of `step` codes (the scan's code tile) and none empty."""
    sms = sm_count(device)
    want = max(1, min(_cdiv(4 * sms, row_blocks), _cdiv(k, step)))
    per_split = _cdiv(_cdiv(k, want), step) * step
    return _cdiv(k, per_split), per_split


def merge(best: Tensor, second: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Combine per-split (S, N) results; splits ascend in code index, so ties keep the lowest split."""
    if best.shape[0] == 1:
        return best[0], second[0], index[0]
    s = best.argmin(dim=0, keepdim=True)
    others = best.scatter(0, s, float("inf")).min(dim=0).values
    return (best.gather(0, s)[0], torch.minimum(second.gather(0, s)[0], others), index.gather(0, s)[0])
