"""d_weight = sum over row chunks of G_c^T @ hidden_c, for half-precision weights, in V x H x 2 bytes.

A float32 accumulator would cost twice the gradient itself (500 MiB for a 32064 x 4096 head) and
summing the chunks in bfloat16 rounds every partial sum to 8 bits: with 32 chunks that measured 5x
PyTorch's error (2.1e-2 vs 4.1e-3, max error / max |d_weight|). Here the partial sums are float16
(11 bits) scaled by a power of two, which keeps them clear of both overflow and the subnormals, and
the buffer becomes the bfloat16 (or float16) result in place at the end:

  scale = 2^k with scale * bound <= 2^15, bound >= every |partial sum| (see `scale_for`);
  acc (V, H) float16 += scale * G_c^T @ hidden_c   (one Triton GEMM per chunk, fp32 in registers);
  d_weight = acc / scale, rounded once to the weight's dtype, written over acc.

Error: one float16 rounding per chunk plus the final one, which measured 2.4e-3 with 8 chunks and
3.3e-3 with 128, against 2.3e-3 for one bfloat16 rounding of the exact sum.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ... import _scratch
from ..._backends import triton_interpreting
from ..._launch_configs import KernelConfigs

_INTERPRET = triton_interpreting()
# 2^15: half of float16's range (65504) spare for the rounding of a partial sum near the bound.
TARGET = 2.0 ** 15
# One candidate each (vlfast/_launch_configs.py): no measurement has asked for more, and the GEMM
# accumulates into acc, so a launch is not safe to repeat for timing.
# The GEMM: a first guess for Hopper, to be tuned on the H200: the accumulator's read + write dominate.
_GEMM = [triton.Config({"BV": 128, "BH": 128, "BK": 64}, num_warps=8, num_stages=3)]
_FINISH = [triton.Config({"BLOCK": 4096}, num_warps=4, num_stages=3)]
GEMM_CONFIGS = KernelConfigs("linear_cross_entropy.dw_acc", lambda key: _GEMM,
                             interpreter=triton.Config({"BV": 32, "BH": 32, "BK": 32}, num_warps=1, num_stages=1))
FINISH_CONFIGS = KernelConfigs("linear_cross_entropy.dw_finish", lambda key: _FINISH,
                               interpreter=triton.Config({"BLOCK": 256}, num_warps=4, num_stages=1))


@triton.jit
def _accumulate_kernel(acc_ptr, g_ptr, h_ptr, scale_ptr, V, H, C, stride_g, stride_h,
                       BV: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, FIRST: tl.constexpr,
                       UPCAST: tl.constexpr):
    """acc[v, j] = fp16(acc[v, j] + scale * sum_k G[k, v] * h[k, j]) for one (BV, BH) tile; the
    FIRST chunk writes without reading (the buffer starts uninitialised: no memset, no read)."""
    rv = tl.program_id(0) * BV + tl.arange(0, BV)
    rh = tl.program_id(1) * BH + tl.arange(0, BH)
    rk = tl.arange(0, BK)
    v_ok = rv < V
    h_ok = rh < H
    total = tl.zeros((BV, BH), dtype=tl.float32)
    g_ptrs = g_ptr + rk[None, :].to(tl.int64) * stride_g + rv[:, None]   # (BV, BK): G^T
    h_ptrs = h_ptr + rk[:, None].to(tl.int64) * stride_h + rh[None, :]   # (BK, BH)
    for k0 in range(0, C, BK):
        k_ok = k0 + rk < C
        gt = tl.load(g_ptrs, mask=v_ok[:, None] & k_ok[None, :], other=0.0)
        hk = tl.load(h_ptrs, mask=k_ok[:, None] & h_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter computes bf16 dots wrongly
            gt = gt.to(tl.float32)
            hk = hk.to(tl.float32)
        total = tl.dot(gt, hk, total)
        g_ptrs += BK * stride_g
        h_ptrs += BK * stride_h
    scale = tl.load(scale_ptr)
    ptrs = acc_ptr + rv[:, None].to(tl.int64) * H + rh[None, :]
    ok = v_ok[:, None] & h_ok[None, :]
    total = scale * total
    if not FIRST:
        total += tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(ptrs, total.to(tl.float16), mask=ok)


@triton.jit
def _bf16_bits(x):
    """float32 -> bfloat16 rounded to nearest even, as 16 bits in a float16 (the interpreter's own
    cast truncates; this gives the GPU's result everywhere)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN
    return rounded.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def _finish_kernel(acc_ptr, scale_ptr, numel, TO_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """acc / scale rounded to the weight's dtype, stored over the same 2 bytes (bf16 bits via fp16)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(acc_ptr + offs, mask=ok, other=0.0).to(tl.float32) / tl.load(scale_ptr)
    if TO_BF16:
        bits = _bf16_bits(x)
    else:
        bits = x.to(tl.float16)
    tl.store(acc_ptr + offs, bits, mask=ok)


def _max_abs(x: Tensor) -> Tensor:
    """max |x| as a float32 device scalar; 0 for an empty tensor (no rows: nothing to bound)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return torch.linalg.vector_norm(x, ord=math.inf).float()


def scale_for(hidden: Tensor, row_weights: Tensor, z_loss: float, lse_bound) -> Tensor:
    """The accumulator's power-of-two scale, a float32 device scalar (no host sync).

    |d_weight[v, j]| and every partial sum <= max|hidden| * sum_i |w_i| * max|dloss_i/dz|, and
    |dloss_i/dz| <= 1 + 2 * z_loss * |lse_i| (softmax terms are at most 1, the softcap's factor too).
    lse_bound: a float32 device scalar >= max |lse_i| (only read when z_loss > 0).
    """
    bound = _max_abs(hidden) * row_weights.abs().sum()
    if z_loss:
        bound = bound * (1.0 + 2.0 * z_loss * lse_bound)
    k = torch.floor(torch.log2(TARGET / bound))  # bound 0 -> +inf, inf / NaN inputs -> -inf / NaN
    return torch.exp2(torch.nan_to_num(k, nan=0.0).clamp(-100.0, 100.0))


def lse_bound(hidden: Tensor, weight: Tensor, bias, softcap: float) -> Tensor:
    """A float32 device scalar >= max_i |lse_i|: |z| <= softcap, or <= max||h_i|| * max||w_v|| + max|b|."""
    v = weight.shape[0]
    if softcap:
        z_max = torch.tensor(softcap, dtype=torch.float32, device=hidden.device)
    else:  # norms in the input dtype (no float32 copy of the weight); 1% covers their rounding
        h_norm = _max_abs(torch.linalg.vector_norm(hidden, dim=1))
        w_norm = _max_abs(torch.linalg.vector_norm(weight, dim=1))
        z_max = 1.01 * h_norm * w_norm
        if bias is not None:
            z_max = z_max + _max_abs(bias)
    return z_max + math.log(v)


class ScaledHalfAccumulator:
    """d_weight (V, H) of a float16 / bfloat16 weight, summed chunk by chunk in scaled float16."""

    def __init__(self, v: int, h: int, dtype: torch.dtype, device: torch.device, scale: Tensor):
        assert dtype in (torch.float16, torch.bfloat16), dtype
        self.dtype = dtype
        self.acc = _scratch.empty(v, h, dtype=torch.float16, device=device)
        self.chunks = 0
        self.scale = scale.reshape(1).to(device=device, dtype=torch.float32)

    def add(self, g: Tensor, hidden_c: Tensor) -> None:
        """acc += scale * g^T @ hidden_c; g (C, V) with unit column stride, hidden_c (C, H) contiguous."""
        v, h = self.acc.shape
        c = g.shape[0]
        if c == 0:
            return
        cfg = GEMM_CONFIGS.choose(())
        grid = (triton.cdiv(v, cfg.kwargs["BV"]), triton.cdiv(h, cfg.kwargs["BH"]))
        _accumulate_kernel[grid](self.acc, g, hidden_c, self.scale, v, h, c, g.stride(0), hidden_c.stride(0),
                                 FIRST=self.chunks == 0, UPCAST=_INTERPRET and g.dtype == torch.bfloat16,
                                 **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        self.chunks += 1

    def result(self) -> Tensor:
        """d_weight in the weight's dtype, in the accumulator's own memory (call once)."""
        n = self.acc.numel()
        if self.chunks == 0:  # no rows: the sum is empty
            self.acc.zero_()
        elif n:
            cfg = FINISH_CONFIGS.choose(())
            _finish_kernel[(triton.cdiv(n, cfg.kwargs["BLOCK"]),)](self.acc, self.scale, n,
                                                                   TO_BF16=self.dtype == torch.bfloat16, **cfg.kwargs,
                                                                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return self.acc.view(self.dtype)
