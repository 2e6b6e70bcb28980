"""The mask caches of attention impl='torch' (torch_impl._plan) and the Triton path (blocks.block_map) are
keyed by the mask tensors' id, shape and version, and a hit must be the same live tensor.

Before the fix a key padding mask without span_ids passed that check vacuously: a new key_valid that
Python placed at a freed one's id (the usual case in a training loop: one mask per batch, same shape)
got the previous batch's plan, so its padding was wrong. examples/train_llava.py's 2-rank test found it
(one rank's loss changed between identical forwards).
"""
import gc

import torch

from vlfast import masks
from vlfast.ops.attention import blocks, torch_impl

CPU = torch.device("cpu")


def _count(check, n: int = 40) -> tuple:
    """(distinct key_valid ids, wrong results) over n causal & key-padding masks of one shape, each
    freed before the next is made, so that ids get reused as in a training loop."""
    g = torch.Generator().manual_seed(0)
    ids, wrong = set(), 0
    for _ in range(n):
        valid = torch.rand(3, 16, generator=g) > 0.4
        valid[:, 0] = True
        mask = masks.causal() & masks.key_padding(valid)
        ids.add(id(mask.key_valid))
        wrong += not check(mask)
        del mask, valid
        gc.collect()
    return len(ids), wrong


def _same_plan(mask) -> bool:
    got = torch_impl._plan(mask, 16, 16, torch.float32, CPU).tiles[0].bias
    return torch.equal(got, torch_impl._dense_plan(mask, 16, 16, torch.float32, CPU).tiles[0].bias)


def _same_block_map(mask) -> bool:
    got = blocks.block_map(mask, 16, 16, 4, 4, CPU).by_query
    want = blocks._lists(blocks._status(mask, 16, 16, 4, 4, CPU))
    return all(torch.equal(getattr(got, f), getattr(want, f)) for f in ("index", "full", "count"))


def test_torch_plan_is_never_another_masks():
    ids, wrong = _count(_same_plan)
    assert ids < 40  # ids were reused: stale entries were there to be hit
    assert wrong == 0


def test_block_map_is_never_another_masks():
    ids, wrong = _count(_same_block_map)
    assert ids < 40
    assert wrong == 0
