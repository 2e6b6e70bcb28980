"""vlfast.linear_cross_entropy: an LM head's cross-entropy without the N x V logits.

The public function validates, picks an implementation, and calls one torch.library op
(vlfast::linear_cross_entropy_forward; vlfast::linear_cross_entropy_backward for reduction "none").
For "mean" / "sum" the forward also returns the gradients of the reduced loss, computed in the same
pass over the logits; the backward only scales them by the upstream scalar. reference.py states the math.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ..._backends import availability, status, triton_why_not_for
from ..._dispatch import resolve_impl
from ..._nvtx import nvtx_range
from . import reference as _reference
from . import torch_impl as _torch_impl

REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_forward(*args):
    from . import triton  # imported on first use: vlfast imports where triton does not
    return triton.forward(*args)


def _triton_backward(*args):
    from . import triton
    return triton.backward(*args)


_FORWARD = {"reference": _reference.forward_chunked, "torch": _torch_impl.forward, "triton": _triton_forward}
_BACKWARD = {"reference": _reference.backward_chunked, "torch": _torch_impl.backward, "triton": _triton_backward}


def _check_targets(targets: Tensor, v: int, ignore_index: int) -> None:
    # One host sync: an out-of-range target would otherwise read outside the logits row.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"vlfast.linear_cross_entropy: targets must lie in [0, {v}) or equal ignore_index "
                         f"({ignore_index}); targets[{i}] = {int(targets[i])}")


def _eager(reduction: str, need_hidden: bool, need_weight: bool, need_bias: bool) -> bool:
    return reduction != "none" and (need_hidden or need_weight or need_bias)


@torch.library.custom_op("vlfast::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
                                 ignore_index: int, label_smoothing: float, softcap: float, z_loss: float,
                                 reduction: str, impl: str, need_hidden: bool, need_weight: bool,
                                 need_bias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse (N,), d_hidden, d_weight, d_bias); the gradients are of the reduced loss, present
    for "mean" / "sum" when their need_* flag is set, else empty."""
    _check_targets(targets, weight.shape[0], ignore_index)
    need = (need_hidden, need_weight, need_bias and bias is not None)
    with nvtx_range("vlfast.linear_cross_entropy.fwd"):
        return _FORWARD[impl](hidden.contiguous(), weight.contiguous(), targets.contiguous(), bias, ignore_index,
                              label_smoothing, softcap, z_loss, reduction, need)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, targets, bias, ignore_index, label_smoothing, softcap, z_loss, reduction, impl,
      need_hidden, need_weight, need_bias):
    n, h = hidden.shape
    v = weight.shape[0]
    ct = _reference.compute_dtype(hidden.dtype)
    eager = _eager(reduction, need_hidden, need_weight, need_bias)
    has_db = eager and need_bias and bias is not None
    return (hidden.new_empty(() if reduction != "none" else (n,), dtype=ct), hidden.new_empty(n, dtype=ct),
            hidden.new_empty(n if eager and need_hidden else 0, h),
            weight.new_empty(v if eager and need_weight else 0, h), weight.new_empty(v if has_db else 0))


@torch.library.custom_op("vlfast::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(grad_rows: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor,
                                  bias: Optional[Tensor], lse: Tensor, ignore_index: int, label_smoothing: float,
                                  softcap: float, z_loss: float, impl: str, need_hidden: bool, need_weight: bool,
                                  need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d_hidden, d_weight, d_bias) of sum_i grad_rows_i * loss_i (reduction "none"); empty where not needed."""
    need = (need_hidden, need_weight, need_bias and bias is not None)
    with nvtx_range("vlfast.linear_cross_entropy.bwd"):
        return _BACKWARD[impl](grad_rows.contiguous(), hidden.contiguous(), weight.contiguous(),
                               targets.contiguous(), bias, lse, ignore_index, label_smoothing, softcap, z_loss, need)


@linear_cross_entropy_backward.register_fake
def _(grad_rows, hidden, weight, targets, bias, lse, ignore_index, label_smoothing, softcap, z_loss, impl,
      need_hidden, need_weight, need_bias):
    n, h = hidden.shape
    v = weight.shape[0]
    return (hidden.new_empty(n if need_hidden else 0, h), weight.new_empty(v if need_weight else 0, h),
            weight.new_empty(v if need_bias and bias is not None else 0))


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias, ignore_index, eps, softcap, z_loss, reduction, impl, nh, nw, nb = inputs
    _, lse, dh, dw, db = output
    ctx.params = (ignore_index, eps, softcap, z_loss, reduction, impl, nh, nw, nb and bias is not None)
    # No zeros for the outputs nobody differentiates (lse, dh, dw, db): autograd would otherwise hand the
    # backward a zero tensor the size of each, another d_hidden + d_weight at the memory peak (measured
    # on an H100: 629 MiB extra instead of 346 at 8192 x 4096 x 32064).
    ctx.set_materialize_grads(False)
    if _traced(lse):  # compiled graphs see every tensor the backward uses among the saved ones
        ctx.save_for_backward(hidden, weight, targets, bias, lse, dh, dw, db)
        return
    ctx.save_for_backward(hidden, weight, targets, bias, lse)
    # Eagerly, the forward's gradients (mean / sum) ride on ctx and the backward hands autograd the only
    # reference, so AccumulateGrad keeps them as .grad rather than a copy (seen on torch 2.11, H100).
    # Non-differentiable: they carry no grad_fn, so ctx holding them makes no reference cycle.
    ctx.mark_non_differentiable(dh, dw, db)
    ctx.forward_grads = [dh, dw, db]


def _traced(t: Tensor) -> bool:
    """True under torch.compile / AOT tracing (fake or functional tensors)."""
    return type(t) is not Tensor  # FakeTensor, FunctionalTensor: subclasses; eager gradients are plain


def _backward(ctx, grad_loss, _lse, _dh, _dw, _db):
    ignore_index, eps, softcap, z_loss, reduction, impl, nh, nw, nb = ctx.params
    if grad_loss is None:  # only lse was differentiated: it is a statistic, with no gradient here
        return (None,) * 13
    if reduction != "none" and getattr(ctx, "grads_consumed", False):
        raise RuntimeError("vlfast.linear_cross_entropy: a second backward through the same graph "
                           "(retain_graph=True) is not supported with reduction='mean' or 'sum', whose "
                           "gradients come from the forward; use reduction='none' and reduce the result")
    if reduction == "none":
        hidden, weight, targets, bias, lse = ctx.saved_tensors[:5]
        dh, dw, db = linear_cross_entropy_backward(grad_loss, hidden, weight, targets, bias, lse, ignore_index, eps,
                                                   softcap, z_loss, impl, nh, nw, nb)
    elif _traced(grad_loss):  # compiled graphs must stay functional
        dh, dw, db = ctx.saved_tensors[5:]
        dh, dw, db = dh * grad_loss, dw * grad_loss, db * grad_loss
    else:  # the forward's gradients are of the reduced loss: scale by the upstream scalar, in place
        ctx.grads_consumed = True  # (a copy of d_weight would cost another V x H at the memory peak)
        dh, dw, db = ctx.forward_grads
        ctx.forward_grads = None
        # x * 1 is x, bit for bit: a plain loss.backward() skips the pass over d_weight (32000 x 256
        # float32: ~2 ms on a CPU); read on a CPU only, where reading the scalar costs no device sync
        if not (grad_loss.device.type == "cpu" and bool(grad_loss == 1)):
            dh, dw, db = dh.mul_(grad_loss), dw.mul_(grad_loss), db.mul_(grad_loss)
    return (dh if nh else None, dw if nw else None, None, db if nb else None) + (None,) * 9


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


def _check(name: str, x, dims: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"vlfast.linear_cross_entropy: {name} must be a tensor, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"vlfast.linear_cross_entropy: {name} must be {dims}-D, got shape {tuple(x.shape)}")


def _check_inputs(hidden, weight, targets, bias) -> None:
    _check("hidden", hidden, 2)
    _check("weight", weight, 2)
    _check("targets", targets, 1)
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"vlfast.linear_cross_entropy: hidden must be float16, bfloat16, float32 or float64, "
                        f"got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"vlfast.linear_cross_entropy: weight is {weight.dtype} but hidden is {hidden.dtype}; "
                        "cast one so both share a dtype")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"vlfast.linear_cross_entropy: targets must hold class indices as int64 (or int32), "
                        f"got {targets.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"vlfast.linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} differ in the hidden dimension")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"vlfast.linear_cross_entropy: weight must be (V, H) with V, H >= 1, got {tuple(weight.shape)}")
    if targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"vlfast.linear_cross_entropy: targets has {targets.shape[0]} entries but hidden has "
                         f"{hidden.shape[0]} rows")
    for name, x in (("weight", weight), ("targets", targets)) + ((("bias", bias),) if bias is not None else ()):
        if x.device != hidden.device:
            raise ValueError(f"vlfast.linear_cross_entropy: {name} is on {x.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check("bias", bias, 1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != weight.dtype:
            raise ValueError(f"vlfast.linear_cross_entropy: bias must be ({weight.shape[0]},) {weight.dtype}, "
                             f"got {tuple(bias.shape)} {bias.dtype}")


def _check_options(reduction, label_smoothing, logit_softcap, z_loss, ignore_index) -> float:
    if reduction not in REDUCTIONS:
        raise ValueError(f"vlfast.linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"vlfast.linear_cross_entropy: ignore_index must be an int, got {ignore_index!r}")
    for name, value in (("label_smoothing", label_smoothing), ("z_loss", z_loss)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):  # True would pass as 1
            raise TypeError(f"vlfast.linear_cross_entropy: {name} must be a number, got {value!r}")
    if logit_softcap is not None and (isinstance(logit_softcap, bool) or not isinstance(logit_softcap, (int, float))):
        raise TypeError(f"vlfast.linear_cross_entropy: logit_softcap must be None or a number, got {logit_softcap!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"vlfast.linear_cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if not (math.isfinite(z_loss) and z_loss >= 0):
        raise ValueError(f"vlfast.linear_cross_entropy: z_loss must be a finite number >= 0, got {z_loss!r}")
    if logit_softcap is None:
        return 0.0
    if not (math.isfinite(logit_softcap) and logit_softcap > 0):
        raise ValueError(f"vlfast.linear_cross_entropy: logit_softcap must be None or a finite number > 0, "
                         f"got {logit_softcap!r}")
    return float(logit_softcap)


def _why_not(device: torch.device, dtype: torch.dtype) -> dict:
    return availability(lambda: triton_why_not_for(device, dtype),
                        lambda: "this op has no CUDA C++ kernel; its GPU path is Triton")


def implementation_status(device: Union[str, torch.device], dtype: torch.dtype = torch.bfloat16) -> dict:
    """{impl: None if it can run inputs on `device` of `dtype`, else the reason} (for `vlfast info`)."""
    return status(_why_not(torch.device(device), dtype))


def _needs_grad(x: Optional[Tensor]) -> bool:
    return x is not None and x.requires_grad and torch.is_grad_enabled()


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor] = None,
                         ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
                         logit_softcap: Optional[float] = None, z_loss: float = 0.0, impl: str = "auto") -> Tensor:
    """Cross-entropy of the logits hidden @ weight.T + bias against targets, without forming them.

    hidden (N, H), weight (V, H), targets (N,) int64 in [0, V) or ignore_index, bias (V,) or None.
    The value is F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=...,
    reduction=..., label_smoothing=...), computed with float32 logits; logit_softcap c caps the logits
    as c * tanh(z / c) first, z_loss adds z_loss * logsumexp(z)**2 per row (PaLM). Gradients flow to
    hidden, weight and bias. reduction "mean" over zero non-ignored rows is NaN (as PyTorch); "none"
    returns (N,) with 0 on ignored rows. The result is float32 (float64 for float64 inputs).
    impl: "auto" | "reference" | "torch" | "triton"; an explicit choice raises if it cannot run.
    """
    _check_inputs(hidden, weight, targets, bias)
    softcap = _check_options(reduction, label_smoothing, logit_softcap, z_loss, ignore_index)
    impl = resolve_impl("linear_cross_entropy", impl, hidden.device, lambda: _why_not(hidden.device, hidden.dtype))
    loss, *_ = linear_cross_entropy_forward(hidden, weight, targets.long(), bias, ignore_index, float(label_smoothing),
                                            softcap, float(z_loss), reduction, impl, _needs_grad(hidden),
                                            _needs_grad(weight), _needs_grad(bias))
    return loss
