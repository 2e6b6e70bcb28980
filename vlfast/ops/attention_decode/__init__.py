"""vlfast.attention_decode: attention of a few new queries against a KV cache (one generation step).

The public function validates, appends k_new / v_new into the cache (vlfast::kv_cache_append, in
place), then calls vlfast::attention_decode. Data-dependent checks (lengths against the capacity,
page indices) run inside the op bodies, eagerly, so compiled graphs stay whole. reference.py states
the math. Inference only: no gradients.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from ..._backends import availability, status, triton_why_not_for
from ..._dispatch import resolve_impl
from ..._nvtx import nvtx_range
from ...masks import Mask
from ..attention import _check_scale, _mask_from, _mask_parts
from . import cuda as _cuda
from . import reference as _reference
from . import torch_impl as _torch
from .reference import capacity

FN = "attention_decode"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_HEAD_DIM = 256
MAX_TRITON_GROUP_ROWS = 128  # query heads per KV head x Sq: the rows one Triton program holds


def _fail(message: str, exc=ValueError):
    raise exc(f"vlfast.{FN}: {message}")


# --- the in-place append ------------------------------------------------------------------------------

def _slots(cache: Tensor, block_table: Optional[Tensor], start: Tensor, count: int):
    """Index tensors (rows, positions) addressing positions start_b .. start_b + count - 1 of every row
    in the (rows, positions, Hkv, D) view of the cache."""
    pos = start.long()[:, None] + torch.arange(count, device=start.device)[None, :]  # (B, count)
    if block_table is None:
        return torch.arange(start.shape[0], device=start.device)[:, None], pos
    page = cache.shape[2]
    return block_table.long().gather(1, pos // page), pos % page


def _append(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor,
            block_table: Optional[Tensor], check: bool) -> None:
    """Writes k_new / v_new (B, Hkv, S_new, D) at positions cache_seqlens[b] .. + S_new - 1, in place."""
    if check:
        _check_lengths(cache_seqlens, k_new.shape[2], k_cache, block_table)
    if block_table is None and cache_seqlens.device.type == "cpu" and cache_seqlens.numel():
        starts = cache_seqlens.tolist()  # a host read costs nothing on a CPU
        if min(starts) == max(starts):  # every row writes the same slots: one slice copy per cache
            s = starts[0]
            k_cache[:, :, s:s + k_new.shape[2]] = k_new
            v_cache[:, :, s:s + v_new.shape[2]] = v_new
            return
    rows, pos = _slots(k_cache, block_table, cache_seqlens, k_new.shape[2])
    for cache, new in ((k_cache, k_new), (v_cache, v_new)):
        cache.transpose(1, 2)[rows, pos] = new.transpose(1, 2)  # (B, S_new, Hkv, D) slots


kv_cache_append = torch.library.custom_op("vlfast::kv_cache_append", _append, mutates_args=("k_cache", "v_cache"))


@kv_cache_append.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, check):
    return None


# --- the attention --------------------------------------------------------------------------------------

def _triton_forward(q, k_cache, v_cache, lengths, block_table, mask, scale, num_splits):
    from . import triton  # imported on first use: vlfast imports where triton does not
    return triton.forward(q, k_cache, v_cache, lengths, block_table, mask, scale, num_splits)


def _decode_masked(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, new_tokens: int,
                   block_table: Optional[Tensor], mask: Optional[Mask], scale: float, num_splits: int, impl: str,
                   check: bool, finite_tail: bool) -> tuple[Tensor, Tensor]:
    """(out like q, lse (B, Hq, Sq) natural log, float32 / float64) over L_b = cache_seqlens + new_tokens."""
    bounds = None
    if check:
        dalle = list(mask.dalle) if mask is not None and mask.dalle else None
        per_token = () if mask is None else (("span_ids", mask.span_ids), ("key_padding", mask.key_valid))
        bounds = _check_lengths(cache_seqlens, new_tokens, k_cache, block_table, dalle, per_token)
    # (an add is a kernel launch: a decode step without new tokens reads the lengths as they are)
    lengths = cache_seqlens + new_tokens if new_tokens or not cache_seqlens.is_contiguous() else cache_seqlens
    with nvtx_range("vlfast.attention_decode"):
        if impl == "reference":
            return _reference.forward(q, k_cache, v_cache, lengths, block_table, mask, scale)
        if impl == "torch":
            return _torch.forward(q, k_cache, v_cache, lengths, block_table, mask, scale, bounds, finite_tail)
        if impl == "cuda":
            return _cuda.forward(q, k_cache, v_cache, lengths, block_table, mask, scale, num_splits)
        return _triton_forward(q, k_cache, v_cache, lengths, block_table, mask, scale, num_splits)


def _decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, new_tokens: int,
            block_table: Optional[Tensor], causal: bool, window: int, span_ids: Optional[Tensor], dalle: list[int],
            key_valid: Optional[Tensor], scale: float, num_splits: int, impl: str, check: bool,
            finite_tail: bool) -> tuple[Tensor, Tensor]:
    """_decode_masked with the mask as the op's schema takes it (its parts)."""
    return _decode_masked(q, k_cache, v_cache, cache_seqlens, new_tokens, block_table,
                          _mask_from(causal, window, span_ids, dalle, key_valid), scale, num_splits, impl, check,
                          finite_tail)


# The torch.library ops are what compiled graphs see; eager calls go straight to the Python bodies (the
# op dispatch costs tens of microseconds, a decode step's budget on a CPU).
attention_decode_op = torch.library.custom_op("vlfast::attention_decode", _decode, mutates_args=())


@attention_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, new_tokens, block_table, causal, window, span_ids, dalle, key_valid,
      scale, num_splits, impl, check, finite_tail):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=_reference.compute_dtype(q.dtype))


# --- validation and dispatch ----------------------------------------------------------------------------

def _check_lengths(cache_seqlens: Tensor, new_tokens: int, k_cache: Tensor, block_table: Optional[Tensor],
                   dalle: Optional[list] = None, per_token: tuple = ()) -> tuple[int, int]:
    """The data-dependent checks (one host sync): lengths within the capacity, the pages they use real.
    Returns the shortest and longest L_b = cache_seqlens + new_tokens."""
    if cache_seqlens.numel() == 0:
        return 0, 0
    cap = capacity(k_cache, block_table)
    lengths = cache_seqlens.long() + new_tokens
    checks = [cache_seqlens.min(), lengths.max()]
    if block_table is not None:
        page = k_cache.shape[2]
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] * page < lengths[:, None]
        bad = used & ((block_table < 0) | (block_table >= k_cache.shape[0]))
        checks.append(bad.any())
    shortest, longest, *bad_page = (int(x) for x in torch.stack(checks).tolist())
    if shortest < 0:
        _fail(f"cache_seqlens must be >= 0, got a minimum of {shortest}")
    if longest > cap:
        what = "S_max" if block_table is None else f"max_pages x page = {block_table.shape[1]} x {k_cache.shape[2]}"
        _fail(f"a row holds {longest} tokens (cache_seqlens + {new_tokens} new) but the cache holds {cap} per row "
              f"({what})")
    if bad_page and bad_page[0]:
        _fail(f"block_table holds page indices outside [0, {k_cache.shape[0]}) (num_pages) in the pages that the "
              "lengths use")
    if dalle is not None and dalle[3] and longest > dalle[0] + dalle[1] * dalle[2]:
        _fail(f"the DALL-E mask covers {dalle[0]} + {dalle[1]} x {dalle[2]} tokens but a row holds {longest} keys")
    for name, x in per_token:
        if x is not None and longest > x.shape[-1]:
            _fail(f"the mask's {name} cover {x.shape[-1]} cache positions but a row holds {longest} keys")
    return shortest + new_tokens, longest


def _check_tensor(name: str, x, dims: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        _fail(f"{name} must be a tensor, got {type(x).__name__}", TypeError)
    if x.dim() != dims:
        _fail(f"{name} must be {dims}-D {layout}, got shape {tuple(x.shape)}")


def _check_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table) -> None:
    _check_tensor("q", q, 4, "(batch, heads, seq, head_dim)")
    cache_layout = "(batch, kv_heads, S_max, head_dim)" if block_table is None else \
        "(num_pages, kv_heads, page_size, head_dim) with a block_table"
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, x, 4, cache_layout)
        if x.dtype != q.dtype:
            _fail(f"{name} must have q's dtype {q.dtype}, got {x.dtype}", TypeError)
        if x.device != q.device:
            _fail(f"{name} must be on q's device {q.device}, got {x.device}")
        if x.stride(-1) != 1:
            _fail(f"{name} must have unit stride along head_dim (it is written in place, so it is not copied)")
    if q.dtype not in _FLOAT_DTYPES:
        _fail(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}", TypeError)
    if k_cache.shape != v_cache.shape:
        _fail(f"k_cache and v_cache must have one shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    b, hq, sq, d = q.shape
    hkv = k_cache.shape[1]
    if k_cache.shape[3] != d or d == 0:
        _fail(f"q and the caches must share a non-zero head_dim, got {d} and {k_cache.shape[3]}")
    if hkv == 0 or hq % hkv:
        _fail(f"q's {hq} heads must be a multiple of the caches' {hkv} kv heads (grouped-query attention)")
    if sq == 0:
        _fail("q must hold at least one query (Sq >= 1)")
    if block_table is None:
        if k_cache.shape[0] != b:
            _fail(f"q has batch {b} but k_cache has batch {k_cache.shape[0]}")
    else:
        _check_tensor("block_table", block_table, 2, "(batch, max_pages)")
        if block_table.dtype not in (torch.int32, torch.int64) or block_table.shape[0] != b:
            _fail(f"block_table must be an int32 (batch={b}, max_pages) tensor, got {block_table.dtype} "
                  f"{tuple(block_table.shape)}", TypeError if block_table.dtype not in (torch.int32, torch.int64)
                  else ValueError)
        if block_table.device != q.device:
            _fail(f"block_table must be on q's device {q.device}, got {block_table.device}")
        if k_cache.shape[2] == 0:
            _fail("the page size (k_cache.shape[2]) must be >= 1")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64) \
            or tuple(cache_seqlens.shape) != (b,):
        _fail(f"cache_seqlens must be an int32 tensor of shape ({b},), got "
              f"{getattr(cache_seqlens, 'dtype', type(cache_seqlens).__name__)} "
              f"{tuple(getattr(cache_seqlens, 'shape', ()))}", TypeError)
    if cache_seqlens.device != q.device:
        _fail(f"cache_seqlens must be on q's device {q.device}, got {cache_seqlens.device}")
    if (k_new is None) != (v_new is None):
        _fail("k_new and v_new go together: pass both or neither")
    if k_new is not None:
        for name, x in (("k_new", k_new), ("v_new", v_new)):
            _check_tensor(name, x, 4, "(batch, kv_heads, new_tokens, head_dim)")
            if x.shape[0] != b or x.shape[1] != hkv or x.shape[3] != d or x.shape != k_new.shape:
                _fail(f"{name} must be ({b}, {hkv}, new_tokens, {d}) like k_new, got {tuple(x.shape)}")
            if x.dtype != q.dtype or x.device != q.device:
                _fail(f"{name} must have q's dtype and device, got {x.dtype} on {x.device}", TypeError)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                       for x in (q, k_cache, v_cache, k_new, v_new)):
        _fail("is for inference and has no gradients; call it under torch.no_grad() or with tensors that do not "
              "require grad (train with vlfast.attention)", RuntimeError)


def _check_mask(mask, batch: int, device) -> Optional[Mask]:
    if mask is None:
        return None
    if not isinstance(mask, Mask):
        _fail(f"mask must be a vlfast.masks.Mask or None, got {type(mask).__name__}", TypeError)
    for name, x in (("span_ids", mask.span_ids), ("key_padding", mask.key_valid)):
        if x is None:
            continue
        if x.device != device:
            _fail(f"the mask's {name} is on {x.device} but q is on {device}; build it with .to(device)")
        if (x.dim() == 2 and x.shape[0] != batch) or x.dim() not in (1, 2) or (name == "key_padding" and x.dim() != 2):
            want = f"(S,) or ({batch}, S)" if name == "span_ids" else f"({batch}, S)"
            _fail(f"the mask's {name} must be {want} over the cache positions, got {tuple(x.shape)}")
    return mask


def _check_num_splits(num_splits) -> int:
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        _fail(f"num_splits must be an int >= 0 (0 picks), got {num_splits!r}")
    return num_splits


def _why_not(device: torch.device, dtype: torch.dtype, head_dim: int, group_rows: int) -> dict:
    def triton():
        if head_dim > MAX_TRITON_HEAD_DIM:
            return f"the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}, got {head_dim}"
        if group_rows > MAX_TRITON_GROUP_ROWS:
            return (f"the Triton kernel holds (query heads per kv head) x Sq <= {MAX_TRITON_GROUP_ROWS} rows per "
                    f"program, got {group_rows}; use vlfast.attention for long query blocks")
        return triton_why_not_for(device, dtype)

    def cuda():
        if head_dim > _cuda.MAX_HEAD_DIM:
            return f"the CUDA kernel takes head dims up to {_cuda.MAX_HEAD_DIM}, got {head_dim}"
        if group_rows > _cuda.MAX_GROUP_ROWS:
            return (f"the CUDA kernel holds (query heads per kv head) x Sq <= {_cuda.MAX_GROUP_ROWS} rows per "
                    f"CTA, got {group_rows}; use vlfast.attention for long query blocks")
        return _cuda.why_not(device, dtype)

    return availability(triton, cuda)


def implementation_status(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16,
                          head_dim: int = 128) -> dict:
    """{impl: None if it can run inputs on `device` of `dtype`, else the reason} (for `vlfast info`)."""
    return status(_why_not(torch.device(device), dtype, head_dim, 1))


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                     k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
                     block_table: Optional[Tensor] = None, mask: Optional[Mask] = None,
                     scale: Optional[float] = None, num_splits: int = 0, return_lse: bool = False,
                     check_lengths: bool = True, finite_tail: bool = False,
                     impl: str = "auto") -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Attention of Sq new queries per row against a KV cache: q (B, Hq, Sq, D) -> (B, Hq, Sq, D).

    k_cache / v_cache: (B, Hkv, S_max, D), any strides with unit head_dim stride (a (B, S_max, Hkv, D)
    cache passes as .transpose(1, 2)); or paged (num_pages, Hkv, page, D) with block_table (B, max_pages)
    int32. cache_seqlens (B,) int32: the tokens each row holds. k_new / v_new (B, Hkv, S_new, D): written
    into the cache at cache_seqlens (in place) before attending, so row b attends to its first
    L_b = cache_seqlens[b] + S_new keys (the caller advances cache_seqlens). Queries are the last Sq of
    those positions; mask (vlfast.masks, cache positions) as for vlfast.attention. Hq a multiple of Hkv.
    num_splits: splits of each row's keys on the Triton path (0 picks). return_lse: also the natural-log
    log-sum-exp (B, Hq, Sq), float32 (-inf for a query that keeps no key, whose output is 0).
    check_lengths: check cache_seqlens against the capacity and the pages they use (one host sync); a
    caller that guarantees them (vlfast.generation.KVCache) passes False, so a step never waits on the host.
    finite_tail: the caller guarantees that every cache slot past a row's L_b holds a finite value
    (KVCache keeps them zero); the torch path then reads them masked instead of copying the rows to zero
    them (a masked key still multiplies its value by 0, and 0 x NaN is NaN). The kernels never read them.
    """
    _check_inputs(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    mask = _check_mask(mask, q.shape[0], q.device)
    scale = _check_scale(FN, scale, q.shape[-1])
    num_splits = _check_num_splits(num_splits)
    group_rows = q.shape[1] // k_cache.shape[1] * q.shape[2]
    impl = resolve_impl(FN, impl, q.device, lambda: _why_not(q.device, q.dtype, q.shape[-1], group_rows))
    if cache_seqlens.dtype != torch.int32:
        cache_seqlens = cache_seqlens.to(torch.int32)
    if block_table is not None and block_table.dtype != torch.int32:
        block_table = block_table.to(torch.int32)
    new_tokens = 0
    compiling = torch.compiler.is_compiling()
    if k_new is not None:
        (kv_cache_append if compiling else _append)(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table,
                                                    bool(check_lengths))
        new_tokens = k_new.shape[2]
    q = q if q.stride(-1) == 1 else q.contiguous()
    if compiling:
        out, lse = attention_decode_op(q, k_cache, v_cache, cache_seqlens, new_tokens, block_table, *_mask_parts(mask),
                                       scale, num_splits, impl, bool(check_lengths), bool(finite_tail))
    else:
        out, lse = _decode_masked(q, k_cache, v_cache, cache_seqlens, new_tokens, block_table, mask, scale,
                                  num_splits, impl, bool(check_lengths), bool(finite_tail))
    return (out, lse) if return_lse else out
