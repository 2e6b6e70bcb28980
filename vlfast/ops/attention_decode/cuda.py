"""CUDA C++ path for decode attention: the kernels in csrc/attention_decode/, reached through vlfast._C.

Same algorithm and partial results as triton.py (split-K over each row's keys, then a merge), on
CUDA cores in fp32 (csrc/attention_decode/split.cu says how the work is laid out). The extension
takes plain integers (data_ptr(), sizes, strides in elements, a dtype code from _C.DTYPE_CODES, the
device index and the current stream's handle) and checks them itself; the caches are read in place
(any strides with unit head_dim stride, or pages of any size through block_table).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._backends import cuda_extension_for, cuda_why_not_for, sm_count
from ..._cuda_args import common_args
from ...masks import Mask

BLOCK_KEYS = 32  # keys per block of the split kernel (split.cu's kBlockKeys)
MAX_SPLITS = 64  # params.h's kMaxSplits
MAX_HEAD_DIM = 256  # params.h's kMaxHeadDim
MAX_GROUP_ROWS = 128  # params.h's kMaxGroupRows: query heads per kv head x Sq


def why_not(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA kernels can run inputs of this device and dtype, else the reason."""
    return cuda_why_not_for("attention_decode", device, dtype)


def _extension(q: Tensor):
    return cuda_extension_for("attention_decode", q.device, q.dtype)


def pick_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Splits per row so that about two CTAs per SM run, none shorter than 4 key blocks."""
    wanted = -(-2 * sm_count(device) // max(1, batch * kv_heads))
    return max(1, min(wanted, max(1, capacity // (4 * BLOCK_KEYS)), MAX_SPLITS))


def _mask_args(mask: Optional[Mask]) -> tuple[dict, list]:
    """The mask as the extension's arguments, and the tensors those pointers point into (kept alive)."""
    spans = None if mask is None or mask.span_ids is None else mask.span_ids.to(torch.int32).contiguous()
    valid = None if mask is None or mask.key_valid is None else mask.key_valid.to(torch.int8).contiguous()
    dalle = mask.dalle if mask is not None and mask.dalle is not None else (0, 0, 1, 0, 1)
    args = dict(span_ids=0 if spans is None else spans.data_ptr(),
                span_len=0 if spans is None else spans.shape[-1],
                span_stride=spans.shape[-1] if spans is not None and spans.dim() == 2 else 0,
                key_valid=0 if valid is None else valid.data_ptr(),
                valid_len=0 if valid is None else valid.shape[-1],
                valid_stride=0 if valid is None else valid.shape[-1],
                causal=bool(mask is not None and mask.causal), window=(mask.window or 0) if mask is not None else 0,
                dalle_kind=int(dalle[3]), text_len=dalle[0], cols=dalle[2], dalle_half=dalle[4] // 2)
    return args, [spans, valid]


def forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, block_table: Optional[Tensor],
            mask: Optional[Mask], scale: float, num_splits: int) -> tuple[Tensor, Tensor]:
    """(out (B, Hq, Sq, D) like q, lse (B, Hq, Sq) float32); lengths (B,) int32 = L_b; q with unit
    head_dim stride, the caches as attention_decode takes them."""
    ext = _extension(q)
    b, hq, sq, d = q.shape
    hkv = k_cache.shape[1]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    splits = min(num_splits or pick_splits(b, hkv, capacity, q.device), MAX_SPLITS)
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, dtype=torch.float32, device=q.device)
    if b == 0:
        return out, lse
    o_part = torch.empty(b, hq, sq, splits, d, dtype=torch.float32, device=q.device)
    lse_part = torch.empty(b, hq, sq, splits, dtype=torch.float32, device=q.device)
    lengths = lengths.to(torch.int32).contiguous()
    table = block_table.to(torch.int32).contiguous() if paged else None
    mask_args, keep_alive = _mask_args(mask)
    ext.attention_decode_forward(
        q=q.data_ptr(), k=k_cache.data_ptr(), v=v_cache.data_ptr(), out=out.data_ptr(), lse=lse.data_ptr(),
        o_part=o_part.data_ptr(), lse_part=lse_part.data_ptr(), lengths=lengths.data_ptr(),
        block_table=table.data_ptr() if paged else 0, batch=b, hq=hq, hkv=hkv, sq=sq, d=d,
        stride_qb=q.stride(0), stride_qh=q.stride(1), stride_qs=q.stride(2),
        stride_kb=k_cache.stride(0), stride_kh=k_cache.stride(1), stride_ks=k_cache.stride(2),
        stride_vb=v_cache.stride(0), stride_vh=v_cache.stride(1), stride_vs=v_cache.stride(2),
        stride_ob=out.stride(0), stride_oh=out.stride(1), stride_os=out.stride(2),
        cache_rows=k_cache.shape[0], page_size=k_cache.shape[2], max_pages=table.shape[1] if paged else 0,
        stride_bt=table.stride(0) if paged else 0, **mask_args, scale=float(scale), splits=splits,
        **common_args(ext, q))
    del keep_alive  # the launch is queued on the stream; the caching allocator keeps the memory for it
    return out, lse
