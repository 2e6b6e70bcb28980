"""KVCache: every layer's keys and values for a batch of sequences, preallocated, contiguous or paged.

    cache = KVCache(layers, batch, kv_heads, head_dim, max_len, page_size=None, dtype=..., device=...)
    # in layer i of a model step over S_new new tokens per row (positions cache.positions(S_new)):
    out = cache.attend(i, q, k_new, v_new, mask)   # appends at cache.seqlens, attends (vlfast.attention_decode)
    cache.advance(n)                               # after the step's last layer: seqlens += n

Every layer of a step appends at the same positions, so seqlens moves once per step, by the tokens each
row took in (a (B,) tensor for prompts of different lengths, or an int). Static shapes, no host sync.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..masks import Mask
from ..ops.attention_decode import attention_decode


class KVCache:
    """Keys and values (layers, B, Hkv, max_len, D), or pages (layers, num_pages, Hkv, page_size, D)
    with a block table (B, max_len / page_size) that gives row b the pages b * n .. b * n + n - 1."""

    def __init__(self, layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int, *,
                 page_size: Optional[int] = None, dtype: torch.dtype = torch.float32, device=None):
        for name, value in (("layers", layers), ("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim),
                            ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"KVCache: {name} must be an int >= 1, got {value!r}")
        if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1):
            raise ValueError(f"KVCache: page_size must be None or an int >= 1, got {page_size!r}")
        self.max_len = max_len
        if page_size is None:
            shape = (layers, batch, kv_heads, max_len, head_dim)
            self.block_table = None
        else:
            per_row = -(-max_len // page_size)
            shape = (layers, batch * per_row, kv_heads, page_size, head_dim)
            self.block_table = torch.arange(batch * per_row, dtype=torch.int32, device=device).view(batch, per_row)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)

    @property
    def batch(self) -> int:
        return self.seqlens.shape[0]

    def positions(self, new_tokens: int) -> Tensor:
        """(B, new_tokens) int64: the positions the next new_tokens of each row take."""
        return self.seqlens.long()[:, None] + torch.arange(new_tokens, device=self.seqlens.device)

    def attend(self, layer: int, q: Tensor, k_new: Tensor, v_new: Tensor, mask: Optional[Mask] = None,
               impl: str = "auto") -> Tensor:
        """q (B, Hq, S_new, D), k_new / v_new (B, Hkv, S_new, D) -> (B, Hq, S_new, D): the new keys and
        values written at seqlens, then attention over each row's seqlens + S_new keys."""
        return attention_decode(q, self.k[layer], self.v[layer], self.seqlens, k_new=k_new, v_new=v_new,
                                block_table=self.block_table, mask=mask, check_lengths=False, impl=impl)

    def layer(self, index: int) -> "LayerCache":
        """Layer `index`'s view, for vlfast.nn.SelfAttention(..., cache=...)."""
        return LayerCache(self, index)

    def advance(self, tokens: Union[int, Tensor]) -> None:
        """seqlens += tokens (an int, or (B,) per row), after a step's last layer."""
        self.seqlens += torch.as_tensor(tokens, dtype=torch.int32, device=self.seqlens.device)

    def reset(self) -> None:
        self.seqlens.zero_()


class LayerCache:
    """One layer of a KVCache: attend(q, k_new, v_new, mask) and the positions of the new tokens."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def positions(self, new_tokens: int) -> Tensor:
        return self.cache.positions(new_tokens)

    def attend(self, q: Tensor, k_new: Tensor, v_new: Tensor, mask: Optional[Mask] = None, impl: str = "auto") -> Tensor:
        return self.cache.attend(self.index, q, k_new, v_new, mask, impl)
