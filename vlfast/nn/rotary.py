"""Rotary position embedding (RoPE), in the rotate-half layout of LLaMA and transformers.

RotaryEmbedding takes its angles in float64 (positions reach 1e5 and more). LlamaRotaryEmbedding takes
them as transformers' LLaMA does (float32 inverse frequencies and products), with its rope scalings
"linear", "dynamic" (NTK) and "llama3", so that checkpoints trained with them see the rotations they
were trained with.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class RotaryEmbedding(nn.Module):
    """apply(x (..., S, D), positions (S,) or (B, S)) rotates feature pairs (i, i + D/2) by
    positions * base ** (-2i / D); so <rope(q, m), rope(k, n)> depends on m - n only."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"{type(self).__name__}: head_dim must be even, got {head_dim}")
        self.head_dim, self.base = head_dim, base

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (..., S, D/2) of the angles at `positions`, in `dtype`."""
        inv_freq = self.base ** (-torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device)
                                 / self.head_dim)
        angles = positions.to(torch.float64)[..., None] * inv_freq
        return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)

    def rotation(self, positions: Tensor, dtype: torch.dtype, packed: bool = False) -> tuple[Tensor, Tensor]:
        """(cos, sin) for rotating tensors of `dtype` (held in float64 for float64, else float32), shaped to
        broadcast against x: (1, 1, S, D/2) for positions (S,) or
        (B, 1, S, D/2) for (B, S), against x (B, H, S, D); packed (T, 1, D/2) against x (T, H, D). A model
        computes it once per forward and every layer rotates with it (apply)."""
        cos, sin = self.cos_sin(positions, torch.float64 if dtype == torch.float64 else torch.float32)
        if packed:
            return cos[:, None], sin[:, None]
        return (cos[None, None], sin[None, None]) if cos.dim() == 2 else (cos[:, None], sin[:, None])

    @staticmethod
    def apply(x: Tensor, rotation: tuple[Tensor, Tensor]) -> Tensor:
        """x rotated by rotation = (cos, sin) from rotation(), in their dtype, returned in x's dtype."""
        cos, sin = rotation
        x1, x2 = x.to(cos.dtype).chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    def forward(self, x: Tensor, positions: Optional[Tensor] = None) -> Tensor:
        """x (B, H, S, D) (or (T, H, D) packed, with positions (T,)); positions default to 0..S-1."""
        packed = x.dim() != 4
        if positions is None:
            positions = torch.arange(x.shape[0 if packed else -2], device=x.device)
        return self.apply(x, self.rotation(positions, x.dtype, packed))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"


class LlamaRotaryEmbedding(RotaryEmbedding):
    """RoPE with LLaMA's rope_theta and rope_scaling, its angles computed as transformers computes them.

    scaling: None, or {"rope_type": "linear", "factor": f} (positions / f), {"rope_type": "dynamic",
    "factor": f} (NTK: past max_position_embeddings the base grows with the longest position of the
    call), {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} (Llama 3.1's per-frequency interpolation).
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: Optional[dict] = None,
                 max_position_embeddings: int = 2048):
        super().__init__(head_dim, base)
        scaling = dict(scaling or {})
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ROPE_TYPES:
            raise ValueError(f"LlamaRotaryEmbedding: rope_type must be one of {ROPE_TYPES}, got {kind!r}")
        needed = {"linear": ("factor",), "dynamic": ("factor",),
                  "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        missing = [k for k in needed.get(kind, ()) if k not in scaling]
        if missing:
            raise ValueError(f"LlamaRotaryEmbedding: rope_scaling {kind!r} needs {', '.join(missing)}")
        self.kind, self.scaling, self.max_position_embeddings = kind, scaling, max_position_embeddings

    def _inv_freq(self, base, device) -> Tensor:
        return 1.0 / (base ** (torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
                               / self.head_dim))

    def inv_freq(self, longest: Optional[int], device) -> Tensor:
        """float32 (D/2,) inverse frequencies; longest: the call's largest position + 1 (dynamic only)."""
        s = self.scaling
        if self.kind == "dynamic":
            # float32 tensor arithmetic on an integer length, as transformers evaluates it
            seq_len = torch.tensor(max(longest or 0, self.max_position_embeddings), device=device)
            dim = self.head_dim
            base = self.base * ((s["factor"] * seq_len / self.max_position_embeddings) - (s["factor"] - 1)) \
                ** (dim / (dim - 2))
            return self._inv_freq(base, device)
        inv_freq = self._inv_freq(self.base, device)
        if self.kind == "linear":
            return inv_freq / s["factor"]
        if self.kind == "llama3":
            old = s["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / s["factor"], inv_freq)
            smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
            smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
            medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        return inv_freq

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # The dynamic base depends on the call's longest position: a host sync, for that scaling only.
        longest = int(positions.max()) + 1 if self.kind == "dynamic" and positions.numel() else None
        angles = positions[..., None].float() * self.inv_freq(longest, positions.device)
        return torch.cos(angles).to(dtype), torch.sin(angles).to(dtype)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}, scaling={self.kind}"
