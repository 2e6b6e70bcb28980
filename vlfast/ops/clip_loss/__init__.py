"""vlfast.clip_loss: CLIP's softmax and SigLIP's sigmoid contrastive losses without the N x M logits.

The public function validates, picks an implementation, and calls one torch.library op
(vlfast::clip_loss_forward, differentiated by vlfast::clip_loss_backward), so torch.compile sees a
single opaque boundary; plain eager calls run the ops' bodies directly (see
vlfast._dispatch.op_bodies_may_run_directly). reference.py states the math.
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Union

import torch
from torch import Tensor

from ..._backends import availability, status, triton_why_not_for
from ..._dispatch import op_bodies_may_run_directly as _eager, resolve_impl
from ..._nvtx import nvtx_range
from . import cuda as _cuda
from . import reference as _reference
from . import torch_impl as _torch_impl

KINDS = ("softmax", "sigmoid")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _reference_forward(a, b, scale, bias, kind, symmetric, offset):
    return _reference.forward_chunked(a, b, scale, bias, kind, symmetric, offset)


def _reference_backward(grad, a, b, scale, bias, stats, kind, symmetric, offset, need_a, need_b):
    return _reference.backward_chunked(grad, a, b, scale, bias, stats, kind, symmetric, offset, need_a, need_b)


def _triton_forward(*args):
    from . import triton  # imported on first use: vlfast imports where triton does not
    return triton.forward(*args)


def _triton_backward(*args):
    from . import triton
    return triton.backward(*args)


_FORWARD = {"reference": _reference_forward, "torch": _torch_impl.forward, "triton": _triton_forward, "cuda": _cuda.forward}
_BACKWARD = {"reference": _reference_backward, "torch": _torch_impl.backward, "triton": _triton_backward, "cuda": _cuda.backward}


def _check_finite_scalars(scale: Tensor, bias: Optional[Tensor]) -> None:
    # One host sync; it turns a silent NaN loss (or a negative scale, which inverts the loss: positives
    # pushed apart) into an error that names the argument. A zero scale is allowed: all logits equal.
    if scale.is_cpu and (bias is None or bias.is_cpu):  # a host read is free: no device ops for it
        s, c = float(scale), 0.0 if bias is None else float(bias)
        good = math.isfinite(s) and s >= 0 and math.isfinite(c)
    else:
        good = torch.isfinite(scale) & (scale >= 0)
        good = bool(good if bias is None else good & torch.isfinite(bias))
    if not good:
        for name, x in (("logit_scale", scale), ("logit_bias", bias)):
            if x is not None and not bool(torch.isfinite(x)):
                raise ValueError(f"vlfast.clip_loss: {name} must be finite, got {float(x)}")
        _check_scale_sign(float(scale))


def _check_scale_sign(scale: float) -> None:
    if scale < 0:
        raise ValueError(f"vlfast.clip_loss: logit_scale must be >= 0 (the multiplier itself, already "
                         f"exponentiated), got {scale}")


def _stats_dtype(a: Tensor) -> torch.dtype:
    return _reference.compute_dtype(a.dtype)


def _forward_body(a, b, scale, bias, kind, symmetric, offset, impl, backward_follows=True):
    """What vlfast::clip_loss_forward runs (see it for the arguments); backward_follows=False: no
    gradient is wanted (impl="torch" then keeps nothing for a backward)."""
    _check_finite_scalars(scale, bias)
    with nvtx_range("vlfast.clip_loss.fwd"):
        extra = (False,) if impl == "torch" and not backward_follows else ()  # torch_impl's backward_follows
        return _FORWARD[impl](a.contiguous(), b.contiguous(), scale, bias, kind, symmetric, offset, *extra)


def _backward_body(grad, a, b, scale, bias, stats, kind, symmetric, offset, impl, need_a, need_b):
    """What vlfast::clip_loss_backward runs (see it for the arguments)."""
    with nvtx_range("vlfast.clip_loss.bwd"):
        return _BACKWARD[impl](grad.contiguous(), a.contiguous(), b.contiguous(), scale, bias, stats,
                               kind, symmetric, offset, need_a, need_b)


@torch.library.custom_op("vlfast::clip_loss_forward", mutates_args=())
def clip_loss_forward(a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor], kind: str,
                      symmetric: bool, offset: int, impl: str) -> tuple[Tensor, Tensor]:
    """Per-row losses (N,) and stats (3, N) for the backward; see reference.py for the math."""
    return _forward_body(a, b, scale, bias, kind, symmetric, offset, impl)


@clip_loss_forward.register_fake
def _(a, b, scale, bias, kind, symmetric, offset, impl):
    n = a.shape[0]
    dt = _stats_dtype(a)
    return a.new_empty(n, dtype=dt), a.new_empty(3, n, dtype=dt)


@torch.library.custom_op("vlfast::clip_loss_backward", mutates_args=())
def clip_loss_backward(grad: Tensor, a: Tensor, b: Tensor, scale: Tensor, bias: Optional[Tensor],
                       stats: Tensor, kind: str, symmetric: bool, offset: int, impl: str,
                       need_a: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(d_a, d_b, d_scale, d_bias) for upstream gradient `grad` (N,) of the per-row losses.

    d_a / d_b are empty (0, D) when need_a / need_b is False (a frozen tower, as in LiT).
    """
    return _backward_body(grad, a, b, scale, bias, stats, kind, symmetric, offset, impl, need_a, need_b)


@clip_loss_backward.register_fake
def _(grad, a, b, scale, bias, stats, kind, symmetric, offset, impl, need_a, need_b):
    dt = _stats_dtype(a)
    return (a.new_empty(a.shape[0] if need_a else 0, a.shape[1]),
            b.new_empty(b.shape[0] if need_b else 0, b.shape[1]),
            a.new_empty((), dtype=dt), a.new_empty((), dtype=dt))


def _setup_context(ctx, inputs, output):
    a, b, scale, bias, kind, symmetric, offset, impl = inputs
    ctx.save_for_backward(a, b, scale, bias, output[1])
    ctx.params = (kind, symmetric, offset, impl)


def _backward(ctx, grad_loss, _grad_stats):
    a, b, scale, bias, stats = ctx.saved_tensors
    kind, symmetric, offset, impl = ctx.params
    need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    args = (grad_loss, a, b, scale, bias, stats, kind, symmetric, offset, impl, need_a, need_b)
    tensors = (grad_loss, a, b, scale, stats) + (() if bias is None else (bias,))
    da, db, dscale, dbias = (_backward_body if _eager(*tensors) else clip_loss_backward)(*args)
    return (da if need_a else None, db if need_b else None, dscale.to(scale.dtype),
            dbias.to(bias.dtype) if bias is not None else None, None, None, None, None)


clip_loss_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerClipLoss(torch.autograd.Function):
    """The op's body with the op's registered backward, for eager calls: cheaper per call than the
    custom op's autograd wrapper (vlfast._dispatch.op_bodies_may_run_directly)."""

    @staticmethod
    def forward(ctx, *inputs):
        loss, stats = _forward_body(*inputs)
        _setup_context(ctx, inputs, (loss, stats))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return _backward(ctx, grad_loss, None)


def _losses(*args) -> Tensor:
    """The per-row losses of clip_loss_forward(*args), differentiable; eager calls skip the op boundary."""
    a, b, scale, bias = args[:4]
    if not _eager(a, b, scale, *(() if bias is None else (bias,))):  # compiled graphs, tracers and modes
        return clip_loss_forward(*args)[0]
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (a, b, scale, bias)):
        return _EagerClipLoss.apply(*args)
    return _forward_body(*args, backward_follows=False)[0]


def _as_scalar_tensor(name: str, x, device: torch.device, features_dtype: torch.dtype) -> Tensor:
    """A 0-d float32 tensor on `device` (float64 for float64 tensors, or numbers with float64 features)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"vlfast.clip_loss: {name} must hold one value, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"vlfast.clip_loss: {name} must be a floating-point tensor, got {x.dtype}")
        x = x.reshape(())
        if x.device != device and x.device.type != "cpu":
            raise ValueError(f"vlfast.clip_loss: {name} is on {x.device} but the features are on {device}")
        return x.to(device=device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if isinstance(x, Real) and not isinstance(x, bool):
        if not math.isfinite(float(x)):
            raise ValueError(f"vlfast.clip_loss: {name} must be finite, got {x}")
        if name == "logit_scale":
            _check_scale_sign(float(x))
        return torch.tensor(float(x), device=device, dtype=_reference.compute_dtype(features_dtype))
    raise TypeError(f"vlfast.clip_loss: {name} must be a tensor or a real number, got {type(x).__name__}")


def _check_features(a, b) -> None:
    for name, x in (("image_features", a), ("text_features", b)):
        if not isinstance(x, Tensor):
            raise TypeError(f"vlfast.clip_loss: {name} must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"vlfast.clip_loss: {name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"vlfast.clip_loss: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"vlfast.clip_loss: {name} is empty (batch 0); the loss needs at least one pair")
        if x.shape[1] == 0:
            raise ValueError(f"vlfast.clip_loss: {name} has feature dimension 0")
    if a.dtype != b.dtype:
        raise TypeError(f"vlfast.clip_loss: image_features is {a.dtype} but text_features is {b.dtype}; "
                        "cast one so both share a dtype")
    if a.device != b.device:
        raise ValueError(f"vlfast.clip_loss: image_features is on {a.device} but text_features is on {b.device}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"vlfast.clip_loss: feature dimensions differ: image_features {tuple(a.shape)}, "
                         f"text_features {tuple(b.shape)}")


def _check_layout(kind: str, reduction: str, symmetric: bool, offset: Optional[int], n: int, m: int) -> int:
    if kind not in KINDS:
        raise ValueError(f"vlfast.clip_loss: kind must be one of {KINDS}, got {kind!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"vlfast.clip_loss: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if offset is None:
        if kind == "softmax":
            raise ValueError("vlfast.clip_loss: kind='softmax' needs positives; positive_offset=None "
                             "(a negative-only block) is for kind='sigmoid'")
        return -1
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"vlfast.clip_loss: positive_offset must be an int or None, got {type(offset).__name__}")
    if offset < 0 or offset + n > m:
        raise ValueError(f"vlfast.clip_loss: positives (i, i + positive_offset) must lie inside the "
                         f"{n} x {m} block: need 0 <= positive_offset <= {m - n}, got {offset}")
    if kind == "softmax" and symmetric and (n != m or offset != 0):
        raise ValueError(f"vlfast.clip_loss: symmetric=True needs a square block with positives on the "
                         f"diagonal (got {n} x {m}, positive_offset={offset}); pass symmetric=False for "
                         "the image->text direction of a rectangular block")
    if kind == "sigmoid" and not symmetric:
        raise ValueError("vlfast.clip_loss: symmetric=False applies to kind='softmax'; the sigmoid loss "
                         "sums over all pairs and has no direction")
    return offset


def _why_not(device: torch.device, dtype: torch.dtype) -> dict:
    """impl -> check returning None if it runs features of this device and dtype, else why not."""
    return availability(lambda: triton_why_not_for(device, dtype), lambda: _cuda.why_not(device, dtype))


def implementation_status(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16) -> dict:
    """{impl: None if it can run features on `device` of `dtype`, else the reason} (for `vlfast info`)."""
    return status(_why_not(torch.device(device), dtype))


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Union[Tensor, float],
              logit_bias: Union[Tensor, float, None] = None, *, kind: str = "softmax",
              reduction: str = "mean", symmetric: bool = True, positive_offset: Optional[int] = 0,
              impl: str = "auto") -> Tensor:
    """Contrastive loss of image features (N, D) against text features (M, D), never forming N x M.

    kind="softmax": CLIP's (cross-entropy over rows + over columns) / 2, positives on the diagonal.
    kind="sigmoid": SigLIP's -sum_ij log sigmoid(z_ij * logit_ij) / N, z = +1 at positives, -1 elsewhere.
    logits = logit_scale * image_features @ text_features.T + logit_bias, where logit_scale is the
    multiplier itself (already exponentiated, as open_clip passes it); both get gradients.

    Blocks for distributed training: rows may be the local batch and columns the gathered one, with
    positives at (i, i + positive_offset); symmetric=False keeps only the image->text direction
    (softmax); positive_offset=None marks a negative-only block (sigmoid).

    reduction: "mean" (over the N rows; for sigmoid, the row sums / N as open_clip), "sum", or
    "none" (N,) per row: softmax gives (row_i + col_i) / 2 when symmetric, sigmoid the row's sum.
    The result is float32 (float64 for float64 features).
    impl: "auto" | "reference" | "torch" | "triton" | "cuda"; an explicit choice raises if it cannot run.
    """
    _check_features(image_features, text_features)
    n, m = image_features.shape[0], text_features.shape[0]
    offset = _check_layout(kind, reduction, symmetric, positive_offset, n, m)
    device = image_features.device
    dtype = image_features.dtype
    scale = _as_scalar_tensor("logit_scale", logit_scale, device, dtype)
    bias = None if logit_bias is None else _as_scalar_tensor("logit_bias", logit_bias, device, dtype)
    impl = resolve_impl("clip_loss", impl, device, lambda: _why_not(device, dtype))
    loss = _losses(image_features, text_features, scale, bias, kind, bool(symmetric) and kind == "softmax", offset,
                   impl)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
