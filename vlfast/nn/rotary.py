"""Rotary position embedding (RoPE), in the rotate-half layout of LLaMA and transformers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class RotaryEmbedding(nn.Module):
    """apply(x (..., S, D), positions (S,) or (B, S)) rotates feature pairs (i, i + D/2) by
    positions * base ** (-2i / D); so <rope(q, m), rope(k, n)> depends on m - n only."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even, got {head_dim}")
        self.head_dim, self.base = head_dim, base

    def forward(self, x: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """x (B, H, S, D) (or (T, H, D) packed, with positions (T,)); positions default to 0..S-1."""
        seq_axis = -2 if x.dim() == 4 else 0
        if positions is None:
            positions = torch.arange(x.shape[seq_axis], device=x.device)
        # angles in float64 (positions reach 1e5 and more), the rotation in float32 / float64
        ct = torch.float64 if x.dtype == torch.float64 else torch.float32
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=x.device) / self.head_dim)
        angles = positions.to(torch.float64)[..., None] * inv_freq  # (..., S, D/2)
        cos, sin = torch.cos(angles).to(ct), torch.sin(angles).to(ct)
        if x.dim() == 4:  # (B?, S, D/2) -> broadcast over heads
            cos, sin = (t[None, None] if t.dim() == 2 else t[:, None] for t in (cos, sin))
        else:  # packed (T, H, D): (T, D/2) -> (T, 1, D/2)
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x.to(ct).chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"
