"""How the Python side hands tensors to vlfast._C: rows laid out as its kernels read them, and the
arguments every call shares (dtype code, device index, the current stream's handle)."""
from __future__ import annotations

import torch
from torch import Tensor

ROW_ALIGN = 16  # bytes: the kernels' vector loads (cp.async, float4) want rows on 16-byte boundaries


def aligned_rows(x: Tensor, align: int = ROW_ALIGN) -> Tensor:
    """x (n, d) itself when it is row-major (unit feature stride, rows not overlapping) with rows
    starting on `align`-byte boundaries, else a copy whose rows do: same values, padding never read.
    Expanded (stride-0) rows are copied too: the C++ side refuses overlapping rows."""
    n, d = x.shape
    per_row = max(1, align // x.element_size())
    if ((x.stride(1) == 1 or d == 1) and x.stride(0) >= d and x.data_ptr() % align == 0
            and x.stride(0) % per_row == 0):
        return x
    padded = torch.empty(n, -(-d // per_row) * per_row, dtype=x.dtype, device=x.device)
    padded[:, :d] = x
    return padded[:, :d]


def common_args(ext, x: Tensor) -> dict:
    """dtype (a code of ext.DTYPE_CODES), device and stream for a call about tensors like x."""
    return dict(dtype=ext.DTYPE_CODES[str(x.dtype).removeprefix("torch.")], device=x.device.index,
                stream=torch.cuda.current_stream(x.device).cuda_stream)
