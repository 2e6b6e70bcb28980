"""vlfast.attention and vlfast.attention_varlen: flash attention with the masks VLMs need.

The public functions validate, pick an implementation and call one torch.library op
(vlfast::attention_forward, differentiated by vlfast::attention_backward). The mask travels as its
parts (flags, ints and the per-token tensors), so compiled graphs see plain tensors. In plain eager
calls, where no compiler, tracer or mode needs the boundary, they run the ops' bodies directly (see
vlfast._dispatch.op_bodies_may_run_directly). reference.py states the math; vlfast.masks the masks.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..._backends import availability, status, triton_why_not_for
from ..._dispatch import op_bodies_may_run_directly as _eager, resolve_impl
from ..._nvtx import nvtx_range
from ...masks import Mask
from . import reference as _reference
from . import torch_impl as _torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_TRITON_HEAD_DIM = 256
_NO_DALLE = [0, 0, 0, 0, 0]


def _mask_from(causal: bool, window: int, span_ids: Optional[Tensor], dalle: list, key_valid: Optional[Tensor]):
    if not (causal or window or span_ids is not None or dalle[3] or key_valid is not None):
        return None
    return Mask(causal=causal, window=window or None, span_ids=span_ids,
                dalle=tuple(dalle) if dalle[3] else None, key_valid=key_valid)


def _mask_parts(mask: Optional[Mask]) -> tuple:
    if mask is None:
        return False, 0, None, list(_NO_DALLE), None
    return (mask.causal, mask.window or 0, mask.span_ids, list(mask.dalle) if mask.dalle else list(_NO_DALLE),
            mask.key_valid)


def _forward_with(module, q, k, v, cu_q, cu_k, mask, scale):
    """module.forward on a dense batch, module.forward_varlen on packed sequences."""
    if cu_q is None:
        return module.forward(q, k, v, mask, scale)
    return module.forward_varlen(q, k, v, cu_q, cu_k, mask, scale)


def _backward_with(module, do, q, k, v, out, lse2, cu_q, cu_k, mask, scale):
    if cu_q is None:
        return module.backward(do, q, k, v, out, lse2, mask, scale)
    return module.backward_varlen(do, q, k, v, out, lse2, cu_q, cu_k, mask, scale)


def _triton_problem(q, k, v, cu_q, cu_k, max_q, max_k, mask, scale):
    from . import triton  # imported on first use: vlfast imports where triton does not
    return triton, triton.Problem(q, k, v, cu_q, cu_k, max_q, max_k, mask, scale)


def _forward_body(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle, key_valid, scale, impl,
                  verdict=None, lse_units="base2"):
    """What vlfast::attention_forward runs (see it for the arguments); verdict: a dict for impl="torch"'s
    forward on a dense batch to note whether its inputs were finite; lse_units: what that forward returns
    for lse (see torch_impl.forward; every other path gives lse2)."""
    if cu_q is not None:  # here, not in attention_varlen: op bodies are not traced, so the syncs keep graphs whole
        _check_packed_offsets(cu_q, cu_k, q.shape[0], k.shape[0], max_q, max_k, dalle)
    mask = _mask_from(causal, window, span_ids, dalle, key_valid)
    with nvtx_range("vlfast.attention.fwd"):
        if impl == "reference":
            return _forward_with(_reference, q, k, v, cu_q, cu_k, mask, scale)
        if impl == "torch" and cu_q is None:
            return _torch.forward(q, k, v, mask, scale, verdict, lse_units)
        if impl == "torch":
            return _torch.forward_varlen(q, k, v, cu_q, cu_k, mask, scale)
        module, problem = _triton_problem(q, k, v, cu_q, cu_k, max_q, max_k, mask, scale)
        return module.forward(problem)


def _backward_body(do, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle, key_valid,
                   scale, impl, inputs_finite=False, lse_units="base2"):
    """What vlfast::attention_backward runs (see it for the arguments); inputs_finite: impl="torch"'s
    forward made out from these q, k, v (autograd's saved tensors) and found them finite; lse_units:
    "natural" when lse2 is that forward's natural lse."""
    mask = _mask_from(causal, window, span_ids, dalle, key_valid)
    with nvtx_range("vlfast.attention.bwd"):
        # impl="torch" takes do in any layout (autograd's is often expanded): no copy here
        if impl == "torch" and cu_q is None:
            return _torch.backward(do, q, k, v, out, lse2, mask, scale, inputs_finite, lse_units)
        if impl == "torch":
            return _torch.backward_varlen(do, q, k, v, out, lse2, cu_q, cu_k, mask, scale)
        do = do.contiguous()
        if impl == "reference":
            return _backward_with(_reference, do, q, k, v, out, lse2, cu_q, cu_k, mask, scale)
        module, problem = _triton_problem(q, k, v, cu_q, cu_k, max_q, max_k, mask, scale)
        return module.backward(problem, do, out, lse2)


@torch.library.custom_op("vlfast::attention_forward", mutates_args=())
def attention_forward(q: Tensor, k: Tensor, v: Tensor, cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int,
                      max_k: int, causal: bool, window: int, span_ids: Optional[Tensor], dalle: list[int],
                      key_valid: Optional[Tensor], scale: float, impl: str) -> tuple[Tensor, Tensor]:
    """(out like q, lse2: (B, H, Sq) or (H, Tq), base-2 log-sum-exp of the scaled scores; float32,
    float64 for float64 inputs)."""
    return _forward_body(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle, key_valid, scale, impl)


@attention_forward.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle, key_valid, scale, impl):
    lse_shape = (q.shape[1], q.shape[0]) if cu_q is not None else (q.shape[0], q.shape[1], q.shape[2])
    return torch.empty_like(q), q.new_empty(lse_shape, dtype=_reference.compute_dtype(q.dtype))


@torch.library.custom_op("vlfast::attention_backward", mutates_args=())
def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse2: Tensor,
                       cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int, max_k: int, causal: bool,
                       window: int, span_ids: Optional[Tensor], dalle: list[int], key_valid: Optional[Tensor],
                       scale: float, impl: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) for upstream do; deterministic. Laid out like q, k, v, except impl="torch" on a dense
    batch: (B, S, H, D) memory order viewed as (B, H, S, D), as PyTorch's CPU attention gives them."""
    return _backward_body(do, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle,
                          key_valid, scale, impl)


@attention_backward.register_fake
def _(do, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle, key_valid, scale, impl):
    if impl == "torch" and cu_q is None:  # the CPU kernel's own layout, so that no copy is needed
        return _torch.empty_grad(q), _torch.empty_grad(k), _torch.empty_grad(v)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle, key_valid, scale, impl = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_q, cu_k, span_ids, key_valid)
    ctx.params = (max_q, max_k, causal, window, dalle, scale, impl)


def _backward(ctx, d_out, _d_lse):
    q, k, v, out, lse2, cu_q, cu_k, span_ids, key_valid = ctx.saved_tensors
    max_q, max_k, causal, window, dalle, scale, impl = ctx.params
    args = (d_out, q, k, v, out, lse2, cu_q, cu_k, max_q, max_k, causal, window, span_ids, dalle, key_valid, scale,
            impl)
    if not _eager(d_out, q, k, v, out):
        dq, dk, dv = attention_backward(*args)
    else:
        dq, dk, dv = _backward_body(*args, inputs_finite=getattr(ctx, "inputs_finite", False),
                                    lse_units=getattr(ctx, "lse_units", "base2"))
    return (dq, dk, dv) + (None,) * 11


attention_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The op's body with the backward register_autograd gives the op, for eager calls: cheaper per
    call than the custom op's autograd wrapper (see _eager). Takes q, k, v and the op's other arguments
    as one tuple (Function.apply walks each argument in Python)."""

    @staticmethod
    def forward(ctx, q, k, v, rest):
        inputs = (q, k, v) + rest
        verdict = {}  # impl="torch": whether the inputs were finite, so the backward checks only d_out
        # impl="torch" on a dense batch keeps the kernel's natural lse: lse never leaves this node
        ctx.lse_units = "natural" if rest[-1] == "torch" and rest[0] is None else "base2"
        out, lse = _forward_body(*inputs, verdict=verdict, lse_units=ctx.lse_units)
        _setup_context(ctx, inputs, (out, lse))
        ctx.inputs_finite = verdict.get("finite", False)
        return out

    @staticmethod
    def backward(ctx, d_out):
        return _backward(ctx, d_out, None)[:3] + (None,)


def _attend(q: Tensor, k: Tensor, v: Tensor, *rest) -> Tensor:
    """out of attention_forward(q, k, v, *rest), differentiable."""
    if not _eager(q, k, v):  # compiled graphs, tracers and modes see the op and its registered autograd
        return attention_forward(q, k, v, *rest)[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, rest)
    return _forward_body(q, k, v, *rest, lse_units=None)[0]


# --- validation and dispatch -------------------------------------------------------------------------

def _fail(fn: str, message: str, exc=ValueError):
    raise exc(f"vlfast.{fn}: {message}")


def _check_qkv(fn: str, q, k, v, dims: int, head_axis: int) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, Tensor):
            _fail(fn, f"{name} must be a tensor, got {type(x).__name__}", TypeError)
        if x.dim() != dims:
            layout = "(batch, heads, seq, head_dim)" if dims == 4 else "(tokens, heads, head_dim)"
            _fail(fn, f"{name} must be {dims}-D {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            _fail(fn, f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}", TypeError)
    if not (q.dtype == k.dtype == v.dtype):
        _fail(fn, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}", TypeError)
    if not (q.device == k.device == v.device):
        _fail(fn, f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        _fail(fn, f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1] or q.shape[-1] == 0:
        _fail(fn, f"q and k must share a non-zero head_dim, got {q.shape[-1]} and {k.shape[-1]}")
    h, h_kv = q.shape[head_axis], k.shape[head_axis]
    if h_kv == 0 or h % h_kv:
        _fail(fn, f"q's {h} heads must be a multiple of k/v's {h_kv} heads (grouped-query attention)")


def _check_mask(fn: str, mask, batch: Optional[int], sk: int, total_k: Optional[int], device) -> Optional[Mask]:
    """sk: the keys per sequence (dense), or the longest packed sequence's when total_k is given."""
    if mask is None:
        return None
    if not isinstance(mask, Mask):
        _fail(fn, f"mask must be a vlfast.masks.Mask or None, got {type(mask).__name__}", TypeError)
    for name, x in (("span_ids", mask.span_ids), ("key_padding", mask.key_valid)):
        if x is not None and x.device != device:
            _fail(fn, f"the mask's {name} is on {x.device} but q is on {device}; build it with .to(device)")
    if mask.span_ids is not None:
        want = total_k if total_k is not None else sk
        if mask.span_ids.shape[-1] != want or (total_k is not None and mask.span_ids.dim() != 1):
            _fail(fn, f"span ids must be {'(total_k,) packed' if total_k is not None else '(S,) or (B, S)'} "
                      f"with S = {want}, got {tuple(mask.span_ids.shape)}")
        if mask.span_ids.dim() == 2 and mask.span_ids.shape[0] != batch:
            _fail(fn, f"span ids have batch {mask.span_ids.shape[0]} but q has batch {batch}")
    if mask.key_valid is not None:
        if total_k is not None:
            _fail(fn, "key_padding does not apply to packed sequences: cu_seqlens already gives their lengths")
        if tuple(mask.key_valid.shape) != (batch, sk):
            _fail(fn, f"key_padding must be ({batch}, {sk}), got {tuple(mask.key_valid.shape)}")
    if mask.dalle is not None and total_k is None:  # packed: checked per sequence in _check_packed_offsets
        text_len, rows, cols = mask.dalle[:3]
        if sk > text_len + rows * cols:  # keys past the grid would get made-up rows and columns
            _fail(fn, f"the DALL-E mask covers {text_len} + {rows} x {cols} tokens but there are {sk} keys")
    return mask


def _check_scale(fn: str, scale, head_dim: int) -> float:
    if scale is None:
        return _reference.default_scale(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        _fail(fn, f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def _why_not(device: torch.device, dtype: torch.dtype, head_dim: int) -> dict:
    def triton():
        if head_dim > MAX_TRITON_HEAD_DIM:
            return f"the Triton kernels take head dims up to {MAX_TRITON_HEAD_DIM}, got {head_dim}"
        return triton_why_not_for(device, dtype)

    return availability(triton, lambda: "attention has no CUDA C++ kernel; its GPU path is Triton")


def implementation_status(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16,
                          head_dim: int = 128) -> dict:
    """{impl: None if it can run inputs on `device` of `dtype`, else the reason} (for `vlfast info`)."""
    return status(_why_not(torch.device(device), dtype, head_dim))


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
              impl: str = "auto") -> Tensor:
    """Scaled dot-product attention, (B, H, Sq, D) x (B, H_kv, Sk, D) -> (B, H, Sq, D).

    H must be a multiple of H_kv (grouped-query / multi-query attention); Sq and Sk may differ
    (queries are the last Sq positions). mask: a vlfast.masks.Mask or None (every pair kept);
    scale defaults to 1 / sqrt(D). A query with no key to attend gets 0. Gradients flow to q, k, v.
    impl: "auto" | "reference" | "torch" | "triton"; an explicit choice raises if it cannot run.
    """
    _check_qkv("attention", q, k, v, 4, 1)
    if q.shape[0] != k.shape[0]:
        _fail("attention", f"q has batch {q.shape[0]} but k/v have batch {k.shape[0]}")
    mask = _check_mask("attention", mask, q.shape[0], k.shape[2], None, q.device)
    scale = _check_scale("attention", scale, q.shape[-1])
    impl = resolve_impl("attention", impl, q.device, lambda: _why_not(q.device, q.dtype, q.shape[-1]))
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    return _attend(q, k, v, None, None, q.shape[2], k.shape[2], *_mask_parts(mask), scale, impl)


def _check_cu(fn: str, name: str, cu, batch: Optional[int], max_len: int, device) -> None:
    """Checks what the offsets' metadata shows; their values are checked in _check_cu_values."""
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
        _fail(fn, f"{name} must be a 1-D int32 tensor of sequence starts, got "
                  f"{getattr(cu, 'dtype', type(cu).__name__)} {tuple(getattr(cu, 'shape', ()))}")
    if cu.device != device:
        _fail(fn, f"{name} is on {cu.device} but q is on {device}")
    if cu.shape[0] < 2 or (batch is not None and cu.shape[0] != batch + 1):
        _fail(fn, f"{name} must have batch + 1 >= 2 entries, got {cu.shape[0]}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        _fail(fn, f"max_seqlen for {name} must be an int >= 0, got {max_len!r}")


def _check_cu_values(fn: str, name: str, cu: Tensor, total: int, max_len: int) -> int:
    """Checks the offsets' values; returns the longest sequence's length."""
    lengths = cu[1:] - cu[:-1]
    # one host sync: inconsistent offsets would read outside the packed tensors
    first, last, shortest, longest = (int(x) for x in torch.stack([cu[0], cu[-1], lengths.min(), lengths.max()]).tolist())
    if first != 0 or last != total or shortest < 0:
        _fail(fn, f"{name} must start at 0, never decrease and end at the {total} packed tokens; "
                  f"got {cu.tolist() if cu.numel() <= 16 else f'first {first}, last {last}'}")
    if longest > max_len:
        _fail(fn, f"a sequence of {longest} tokens is longer than max_seqlen {max_len} ({name})")
    return longest


def _check_packed_offsets(cu_q: Tensor, cu_k: Tensor, total_q: int, total_k: int, max_q: int, max_k: int,
                          dalle: list) -> None:
    """The data-dependent checks of attention_varlen (run inside the op body, eagerly, never traced)."""
    fn = "attention_varlen"
    _check_cu_values(fn, "cu_seqlens_q", cu_q, total_q, max_q)
    longest_k = _check_cu_values(fn, "cu_seqlens_k", cu_k, total_k, max_k)
    text_len, rows, cols, is_dalle = dalle[:4]
    if is_dalle and longest_k > text_len + rows * cols:  # keys past the grid would get made-up rows and columns
        _fail(fn, f"the DALL-E mask covers {text_len} + {rows} x {cols} tokens but a sequence has {longest_k} keys")


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
                     impl: str = "auto") -> Tensor:
    """Attention over packed sequences: q (Tq, H, D), k / v (Tk, H_kv, D) -> (Tq, H, D).

    Sequence b holds q tokens cu_seqlens_q[b]:cu_seqlens_q[b+1] and k/v tokens likewise (int32,
    batch + 1 entries, from 0 to the totals); zero-length sequences are allowed. Masks apply within
    each sequence (positions count from its start; span ids are packed by token, (Tk,)).
    """
    fn = "attention_varlen"
    _check_qkv(fn, q, k, v, 3, 1)
    _check_cu(fn, "cu_seqlens_q", cu_seqlens_q, None, max_seqlen_q, q.device)
    _check_cu(fn, "cu_seqlens_k", cu_seqlens_k, cu_seqlens_q.shape[0] - 1, max_seqlen_k, q.device)
    mask = _check_mask(fn, mask, cu_seqlens_q.shape[0] - 1, max_seqlen_k, k.shape[0], q.device)
    scale = _check_scale(fn, scale, q.shape[-1])
    impl = resolve_impl("attention", impl, q.device, _why_not(q.device, q.dtype, q.shape[-1]))
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _attend(q, k, v, cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32), max_seqlen_q, max_seqlen_k,
                   *_mask_parts(mask), scale, impl)
