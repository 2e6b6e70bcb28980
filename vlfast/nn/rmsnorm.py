"""RMSNorm: x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (LLaMA's, transformers' LlamaRMSNorm)."""
from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x (..., dim) -> (..., dim) in x's dtype: the statistics and the normalisation in float32 (float64
    inputs too: checkpoints were trained so, and transformers computes it so), then cast back and scaled
    by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        if not eps > 0:
            raise ValueError(f"RMSNorm: eps must be > 0, got {eps!r}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"RMSNorm: x must have last dimension {self.weight.shape[0]}, got shape {tuple(x.shape)}")
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
