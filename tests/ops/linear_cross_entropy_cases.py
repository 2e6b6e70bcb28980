"""Inputs, the float64 reference and the same-dtype PyTorch baseline for the linear cross-entropy tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import vlfast
from vlfast.ops.linear_cross_entropy.reference import linear_cross_entropy_dense, reduce

from .clip_loss_cases import _collect as collect, _leaf

NAMES = ("loss", "hidden", "weight", "bias")
IGNORE = -100


@dataclass
class Case:
    n: int
    h: int
    v: int
    dtype: torch.dtype
    reduction: str = "mean"
    label_smoothing: float = 0.0
    softcap: Optional[float] = None
    z_loss: float = 0.0
    bias: bool = False
    ignored: float = 0.2  # fraction of rows whose target is IGNORE
    device: str = "cpu"


def make_inputs(case: Case):
    """Fresh random hidden states, an LM-head-like weight, targets with ignored rows, an upstream gradient."""
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    hidden = torch.randn(case.n, case.h, dtype=torch.float64, generator=g)
    weight = torch.randn(case.v, case.h, dtype=torch.float64, generator=g) * (2.0 / case.h ** 0.5)
    bias = torch.randn(case.v, dtype=torch.float64, generator=g) if case.bias else None
    targets = torch.randint(0, case.v, (case.n,), generator=g)
    targets[torch.rand(case.n, generator=g) < case.ignored] = IGNORE
    grad = torch.rand(case.n, dtype=torch.float64, generator=g) + 0.5 if case.reduction == "none" \
        else torch.tensor(1.3, dtype=torch.float64)
    dev, dt = case.device, case.dtype
    return (hidden.to(dev, dt), weight.to(dev, dt), None if bias is None else bias.to(dev, dt), targets.to(dev),
            grad.to(dev))


def _collect(loss, grad, leaves):
    return collect(loss, grad, leaves, NAMES)


def reference64(case: Case, hidden, weight, bias, targets, grad):
    leaves = [_leaf(hidden, torch.float64), _leaf(weight, torch.float64), _leaf(bias, torch.float64)]
    rows = linear_cross_entropy_dense(leaves[0], leaves[1], targets, leaves[2], IGNORE, case.label_smoothing,
                                      case.softcap or 0.0, case.z_loss)
    return _collect(reduce(rows, targets, IGNORE, case.reduction), grad, leaves)


def pytorch_same_dtype(case: Case, hidden, weight, bias, targets, grad):
    """What a user writes today: F.linear in the input dtype, then the loss in float32."""
    leaves = [_leaf(hidden), _leaf(weight), _leaf(bias)]
    z = F.linear(leaves[0], leaves[1], leaves[2]).float()
    if case.softcap:
        z = case.softcap * torch.tanh(z / case.softcap)
    rows = F.cross_entropy(z, targets, ignore_index=IGNORE, reduction="none", label_smoothing=case.label_smoothing)
    if case.z_loss:
        rows = rows + case.z_loss * torch.logsumexp(z, dim=1) ** 2 * (targets != IGNORE)
    return _collect(reduce(rows, targets, IGNORE, case.reduction), grad, leaves)


def run_vlfast(case: Case, impl: str, hidden, weight, bias, targets, grad):
    leaves = [_leaf(hidden), _leaf(weight), _leaf(bias)]
    loss = vlfast.linear_cross_entropy(leaves[0], leaves[1], targets, bias=leaves[2], ignore_index=IGNORE,
                                       reduction=case.reduction, label_smoothing=case.label_smoothing,
                                       logit_softcap=case.softcap, z_loss=case.z_loss, impl=impl)
    return _collect(loss, grad, leaves)
