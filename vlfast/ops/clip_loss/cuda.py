"""CUDA C++ path for the contrastive loss: the kernels in csrc/clip_loss/, reached through vlfast._C.

Same algorithm and partial results as triton.py (see its docstring), so partials.py combines them and
runs the backward's GEMMs for both. The extension takes plain integers (data_ptr(), sizes, strides in
elements, a dtype code, the device index and the current stream's handle) and checks them itself.

The kernels' vector loads want every row to start on a 16-byte boundary: features whose rows do not
(a feature dimension such as 100 in bf16, or a view starting mid-row) are copied once per call into a
buffer with padded rows; the padding is never read.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..._backends import cuda_extension_for, cuda_why_not_for
from ..._cuda_args import ROW_ALIGN, aligned_rows, common_args
from . import partials


def why_not(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA kernels can run features of this device and dtype, else the reason."""
    return cuda_why_not_for("clip_loss", device, dtype)


def _extension(a: Tensor):
    return cuda_extension_for("clip_loss", a.device, a.dtype)


class _Call:
    """The arguments every kernel of one call shares."""

    def __init__(self, ext, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor]):
        self.ext = ext
        self.a, self.b = aligned_rows(a), aligned_rows(b)
        self.scale = scale.float()
        self.bias = bias.float() if bias is not None else None
        self.common = dict(scale=self.scale.data_ptr(), bias=0 if self.bias is None else self.bias.data_ptr(),
                           d=a.shape[1], stride_a=self.a.stride(0), stride_b=self.b.stride(0),
                           **common_args(ext, a))
        self.tile_rows, self.tile_cols = ext.clip_loss_tile(self.common["dtype"])


def forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str, symmetric: bool,
            offset: int) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) float32 and stats (3, N), as triton.forward."""
    ext = _extension(a)
    n, m = a.shape[0], b.shape[0]
    call = _Call(ext, a, b, scale, bias)
    row_blocks = partials.cdiv(n, call.tile_rows)
    splits, cols_per_split = partials.column_splits(row_blocks, m, a.device, call.tile_cols)
    stats, row_part, col_part = partials.forward_partials(n, m, row_blocks, splits, symmetric, a.device)
    if kind == "softmax":
        ext.clip_loss_positive(a=call.a.data_ptr(), b=call.b.data_ptr(), out=stats[0].data_ptr(), n=n, m=m,
                               offset=offset, **call.common)
    ext.clip_loss_stats(a=call.a.data_ptr(), b=call.b.data_ptr(), pos=stats[0].data_ptr(),
                        row_part=row_part.data_ptr(), col_part=0 if col_part is None else col_part.data_ptr(),
                        n=n, m=m, offset=offset, cols_per_split=cols_per_split, splits=splits,
                        sigmoid=kind == "sigmoid", symmetric=symmetric, **call.common)
    return partials.combine_forward(stats, row_part, col_part, kind, symmetric)


def backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], stats: Tensor,
             kind: str, symmetric: bool, offset: int, need_a: bool, need_b: bool):
    """(d_a, d_b, d_scale, d_bias) of sum_i grad_i * loss_i, as triton.backward."""
    ext = _extension(a)
    n, d = a.shape
    m = b.shape[0]
    call = _Call(ext, a, b, scale, bias)
    chunk = partials.grad_chunk_rows(n, m, d, a.element_size(), partials.GRAD_CHUNK_BYTES)
    parts = partials.cdiv(chunk, call.tile_rows) * partials.cdiv(m, call.tile_cols)
    per_row = ROW_ALIGN // a.element_size()
    a_rows = call.a.stride(0)

    def launch(r0, c, g, w, em, ds_part, db_part):
        ext.clip_loss_grad(a=call.a.data_ptr() + r0 * a_rows * a.element_size(), b=call.b.data_ptr(),
                           g=g.data_ptr(), stats=stats.data_ptr(), em=em.data_ptr(), w=w.data_ptr(),
                           ds_part=ds_part.data_ptr(), db_part=db_part.data_ptr(), c=c, n=n, m=m, r0=r0,
                           offset=offset, stride_g=g.stride(0), parts=parts, sigmoid=kind == "sigmoid",
                           symmetric=symmetric, **call.common)

    # G's rows padded to 16 bytes for the kernel's vector stores; the GEMMs take the strided view.
    return partials.backward(grad, a, b, stats, symmetric, need_a, need_b, chunk, parts, launch,
                             g_row_elems=partials.cdiv(m, per_row) * per_row)
