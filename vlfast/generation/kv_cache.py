"""KVCache: every layer's keys and values for a batch of sequences, preallocated, contiguous or paged.

    cache = KVCache(layers, batch, kv_heads, head_dim, max_len, page_size=None, dtype=..., device=...)
    # in layer i of a model step over S_new new tokens per row (positions cache.positions(S_new)):
    out = cache.attend(i, q, k_new, v_new, mask)   # appends at cache.seqlens, attends (vlfast.attention_decode)
    cache.advance(n)                               # after the step's last layer: seqlens += n

Every layer of a step appends at the same positions, so seqlens moves once per step, by the tokens each
row took in (a (B,) tensor for prompts of different lengths, or an int). Static shapes, no host sync.
Every slot past a row's length holds 0 (what a step wrote there, e.g. a right-padded prompt's padding,
is zeroed when the cache advances by less), so attention reads those slots masked, without copying the
rows to clear them (attention_decode's finite_tail).
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
        self._written = 0  # the new tokens per row of the last attend, at seqlens

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
        self._written = k_new.shape[2] if isinstance(k_new, Tensor) and k_new.dim() == 4 else 0
        return attention_decode(q, self.k[layer], self.v[layer], self.seqlens, k_new=k_new, v_new=v_new,
                                block_table=self.block_table, mask=mask, check_lengths=False, finite_tail=True,
                                impl=impl)

    def layer(self, index: int) -> "LayerCache":
        """Layer `index`'s view, for vlfast.nn.SelfAttention(..., cache=...)."""
        return LayerCache(self, index)

    def advance(self, tokens: Union[int, Tensor]) -> None:
        """seqlens += tokens (an int, or (B,) per row), after a step's last layer; what the step wrote
        past a row's new length (the padding of a shorter prompt) is zeroed."""
        self.seqlens += torch.as_tensor(tokens, dtype=torch.int32, device=self.seqlens.device)
        if not isinstance(tokens, int) or tokens < self._written:
            past = self._past()
            self.k.masked_fill_(past, 0)
            self.v.masked_fill_(past, 0)
        self._written = 0

    def reset(self) -> None:
        """Empties every row (and zeroes the keys and values)."""
        self.seqlens.zero_()
        self.k.zero_()
        self.v.zero_()
        self._written = 0

    def _past(self) -> Tensor:
        """bool, broadcasting over self.k: the slots at or past their row's length."""
        b = self.batch
        if self.block_table is None:
            positions = torch.arange(self.k.shape[3], device=self.seqlens.device)
            return (positions >= self.seqlens[:, None])[None, :, None, :, None]  # (1, B, 1, max_len, 1)
        per_row, page = self.block_table.shape[1], self.k.shape[3]
        positions = torch.arange(per_row * page, device=self.seqlens.device).view(per_row, page)
        past = positions >= self.seqlens[:, None, None]  # (B, per_row, page): row b's pages are b * n .. b * n + n - 1
        return past.view(b * per_row, page)[None, :, None, :, None]


class LayerCache:
    """One layer of a KVCache: attend(q, k_new, v_new, mask) and the positions of the new tokens."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def positions(self, new_tokens: int) -> Tensor:
        return self.cache.positions(new_tokens)

    def attend(self, q: Tensor, k_new: Tensor, v_new: Tensor, mask: Optional[Mask] = None, impl: str = "auto") -> Tensor:
        return self.cache.attend(self.index, q, k_new, v_new, mask, impl)
