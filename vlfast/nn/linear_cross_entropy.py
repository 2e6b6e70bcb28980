"""LinearCrossEntropy: an LM head and its cross-entropy in one module, never forming the logits."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.linear_cross_entropy import _check_options, linear_cross_entropy


def _check_module_options(options: dict) -> None:
    """Bad options fail when the module is built, not at its first forward."""
    _check_options(options["reduction"], options["label_smoothing"], options["logit_softcap"], options["z_loss"],
                   options["ignore_index"])


class LinearCrossEntropy(nn.Module):
    """forward(hidden (..., H), targets (...)) -> the loss of logits = hidden @ weight.T + bias.

    Holds weight (V, H) and optional bias (V,) like nn.Linear(H, V); `from_linear` wraps an existing
    head (for example a model's lm_head, tied or not) without copying it. `logits(hidden)` gives the
    logits for generation. Options are those of vlfast.linear_cross_entropy.
    """

    def __init__(self, in_features: int, num_classes: int, bias: bool = False, *, ignore_index: int = -100,
                 reduction: str = "mean", label_smoothing: float = 0.0, logit_softcap: Optional[float] = None,
                 z_loss: float = 0.0, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        self.in_features, self.num_classes = in_features, num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_classes, device=device, dtype=dtype)) if bias else None
        self.options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                            logit_softcap=logit_softcap, z_loss=z_loss, impl=impl)
        _check_module_options(self.options)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> "LinearCrossEntropy":
        """A loss module sharing `linear`'s weight and bias (the same Parameters, not copies)."""
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        module.in_features, module.num_classes = linear.in_features, linear.out_features
        module.weight, module.bias = linear.weight, linear.bias
        module.options = dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, logit_softcap=None,
                              z_loss=0.0, impl="auto")
        unknown = set(options) - set(module.options)
        if unknown:
            raise TypeError(f"LinearCrossEntropy.from_linear: unknown options {sorted(unknown)}")
        module.options.update(options)
        _check_module_options(module.options)
        return module

    def forward(self, hidden: Tensor, targets: Tensor) -> Tensor:
        if hidden.shape[:-1] != targets.shape:
            raise ValueError(f"LinearCrossEntropy: hidden {tuple(hidden.shape)} must be targets' shape "
                             f"{tuple(targets.shape)} plus a feature dimension")
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.weight, targets.reshape(-1),
                                    bias=self.bias, **self.options)

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., H) -> logits (..., V), capped like the loss sees them."""
        z = F.linear(hidden, self.weight, self.bias)
        cap = self.options["logit_softcap"]
        return cap * torch.tanh(z / cap) if cap else z

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, bias={self.bias is not None}, " \
               + ", ".join(f"{k}={v!r}" for k, v in self.options.items())
