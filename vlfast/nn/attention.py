"""SelfAttention and CrossAttention: projections around vlfast.attention, for the models."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch
from torch import Tensor, nn

from ..masks import Mask
from ..ops.attention import attention, attention_varlen
from .rotary import RotaryEmbedding

if TYPE_CHECKING:
    from ..generation.kv_cache import LayerCache


def _heads(x: Tensor, heads: int) -> Tensor:
    """(B, S, heads * Dh) -> (B, heads, S, Dh)."""
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def _check_features(cls: str, name: str, x: Tensor, size: int) -> None:
    """A wrong last dim would otherwise crash inside the projection's matmul."""
    if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != size:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{cls}: {name} must have last dimension {size}, got shape {got}")


def _head_layout(cls: str, dim: int, num_heads: int, num_kv_heads: Optional[int], head_dim: Optional[int]):
    """(num_kv_heads, head_dim) with their defaults, checked."""
    num_kv_heads = num_kv_heads or num_heads
    if head_dim is None and dim % num_heads:
        raise ValueError(f"{cls}: dim ({dim}) must be divisible by num_heads ({num_heads}), or pass head_dim")
    if num_heads % num_kv_heads:
        raise ValueError(f"{cls}: num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    return num_kv_heads, head_dim or dim // num_heads


class SelfAttention(nn.Module):
    """Multi-head self-attention: x (B, S, dim) -> (B, S, dim), or packed x (T, dim) with cu_seqlens.

    num_kv_heads < num_heads gives grouped-query attention; rotary=True applies RoPE to queries and
    keys (positions 0..S-1 per sequence, or `positions`), or pass a RotaryEmbedding (e.g. LLaMA's with its
    scaling). mask: a vlfast.masks.Mask.
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: Optional[int] = None, head_dim: Optional[int] = None,
                 bias: bool = True, rotary: Union[bool, RotaryEmbedding] = False, rotary_base: float = 10000.0,
                 impl: str = "auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = _head_layout("SelfAttention", dim, num_heads, num_kv_heads, head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim, self.impl = num_heads, num_kv_heads, head_dim, impl
        kw = dict(device=device, dtype=dtype)
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **kw)
        self.out = nn.Linear(num_heads * head_dim, dim, bias=bias, **kw)
        if isinstance(rotary, RotaryEmbedding):
            if rotary.head_dim != head_dim:
                raise ValueError(f"SelfAttention: the rotary embedding's head_dim {rotary.head_dim} is not {head_dim}")
            self.rotary = rotary
        else:
            self.rotary = RotaryEmbedding(head_dim, rotary_base) if rotary else None

    def forward(self, x: Tensor, mask: Optional[Mask] = None, *, positions: Optional[Tensor] = None,
                rotation: Optional[tuple[Tensor, Tensor]] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None, cache: Optional["LayerCache"] = None) -> Tensor:
        """cache: this layer's view of a vlfast.generation.KVCache (cache.layer(i)): x (B, S_new, dim) are
        new tokens, their keys and values go into the cache and they attend to everything before them
        (mask in cache positions; positions default to the cache's). rotation: self.rotary.rotation(positions,
        ...) computed once by the model for all its layers (then positions is not read)."""
        _check_features("SelfAttention", "x", x, self.qkv.in_features)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_size, kv_size, kv_size], dim=-1)
        if cu_seqlens is not None and cache is None:  # packed (T, dim)
            q, k, v = (t.view(t.shape[0], -1, self.head_dim) for t in (q, k, v))
            if self.rotary is not None and rotation is None and positions is None:
                positions = packed_positions(cu_seqlens, x.shape[0])
            q, k = self._rotate(q, k, positions, rotation, packed=True)
            out = attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, mask=mask, impl=self.impl)
            return self.out(out.reshape(out.shape[0], -1))
        q, k, v = _heads(q, self.num_heads), _heads(k, self.num_kv_heads), _heads(v, self.num_kv_heads)
        if cache is not None:
            if self.rotary is not None and rotation is None and positions is None:
                positions = cache.positions(x.shape[1])
            q, k = self._rotate(q, k, positions, rotation)
            out = cache.attend(q, k, v, mask, impl=self.impl)
        else:
            q, k = self._rotate(q, k, positions, rotation)
            out = attention(q, k, v, mask=mask, impl=self.impl)
        return self.out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def _rotate(self, q: Tensor, k: Tensor, positions: Optional[Tensor], rotation, packed: bool = False):
        """q and k rotated by one (cos, sin), computed here from positions (default 0..S-1) unless given."""
        if self.rotary is None:
            if rotation is not None:
                raise ValueError("SelfAttention: a rotation was passed but this layer has no rotary embedding")
            return q, k
        if rotation is None:
            if positions is None:
                positions = torch.arange(q.shape[-2], device=q.device)
            rotation = self.rotary.rotation(positions, q.dtype, packed)
        return self.rotary.apply(q, rotation), self.rotary.apply(k, rotation)


def packed_positions(cu_seqlens: Tensor, total: int) -> Tensor:
    """(T,) positions restarting at 0 at each packed sequence's start."""
    starts = torch.repeat_interleave(cu_seqlens[:-1], cu_seqlens[1:] - cu_seqlens[:-1])
    return torch.arange(total, device=cu_seqlens.device) - starts


class CrossAttention(nn.Module):
    """Queries from x (B, Sq, dim) attend to context (B, Sk, context_dim) -> (B, Sq, dim).

    mask: a vlfast.masks.Mask over (Sq, Sk), typically key_padding for a padded context.
    """

    def __init__(self, dim: int, num_heads: int, *, context_dim: Optional[int] = None, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, bias: bool = True, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads, head_dim = _head_layout("CrossAttention", dim, num_heads, num_kv_heads, head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim, self.impl = num_heads, num_kv_heads, head_dim, impl
        kw = dict(device=device, dtype=dtype)
        self.q = nn.Linear(dim, num_heads * head_dim, bias=bias, **kw)
        self.kv = nn.Linear(context_dim or dim, 2 * num_kv_heads * head_dim, bias=bias, **kw)
        self.out = nn.Linear(num_heads * head_dim, dim, bias=bias, **kw)

    def forward(self, x: Tensor, context: Tensor, mask: Optional[Mask] = None) -> Tensor:
        _check_features("CrossAttention", "x", x, self.q.in_features)
        _check_features("CrossAttention", "context", context, self.kv.in_features)
        q = _heads(self.q(x), self.num_heads)
        k, v = (_heads(t, self.num_kv_heads) for t in self.kv(context).chunk(2, dim=-1))
        out = attention(q, k, v, mask=mask, impl=self.impl)
        return self.out(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
