"""CUDA C++ path for the contrastive loss: kernels in csrc/, reached through vlfast._C.

The kernels come with the CUDA-extension work. Until vlfast._C carries `clip_loss_forward`,
vlfast._backends.cuda_why_not reports impl="cuda" unavailable with the reason, so the dispatcher
never reaches these functions; calling them directly raises the same reason.
"""
from __future__ import annotations

from ..._backends import cuda_why_not
from ..._dispatch import ImplUnavailableError


def _unavailable(a):
    reason = cuda_why_not("clip_loss", a.device)
    raise ImplUnavailableError(f"vlfast.clip_loss: impl='cuda' cannot run here: {reason or 'no CUDA kernels yet'}")


def forward(a, b, scale, bias, kind, symmetric, offset):
    _unavailable(a)


def backward(grad, a, b, scale, bias, stats, kind, symmetric, offset, need_a, need_b):
    _unavailable(a)
