"""DALL-E's discrete VAE (Ramesh et al., 2021): images <-> a grid of tokens from a vocabulary.

    pixels (B, 3, H, W) in [0, 1] -> map_pixels -> encoder -> logits (B, K, H/8, W/8) over the vocabulary
      -> quantizer: GumbelQuantizer (relaxed one-hot x codebook, KL to the uniform prior) or VectorQuantizer
      -> (B, n_init, H/8, W/8) -> decoder -> (B, 6, H, W): a logit-Laplace distribution per pixel channel
    loss = logit-Laplace negative log-likelihood of the mapped pixels + the quantizer's loss (KL x beta for
    Gumbel: the evidence lower bound of the seed)

OpenAI's architecture: a 7x7 input convolution, 4 groups of residual blocks of widths 1, 2, 4, 8 x n_hid with
2x2 max-pooling between groups (nearest 2x upsampling in the decoder, widths reversed), every residual
branch scaled by 1 / (number of blocks)^2, a 1x1 convolution to the vocabulary's logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.quantizers import GumbelQuantizer, QuantizerOutput, VectorQuantizer
from ..ops.codebook_lookup import codebook_lookup
from ._config import check_positive

EPSILON = 0.1  # map_pixels squeezes [0, 1] into [0.1, 0.9]: the logit-Laplace density needs x away from 0 and 1
QUANTIZERS = ("gumbel", "vq")


def map_pixels(x: Tensor, eps: float = EPSILON) -> Tensor:
    """[0, 1] -> [eps, 1 - eps]."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: Tensor, eps: float = EPSILON) -> Tensor:
    """The inverse of map_pixels, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(x: Tensor, mu: Tensor, log_b: Tensor) -> Tensor:
    """Mean negative log-likelihood of x in (0, 1) under the logit-Laplace density
    f(x) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)), b = exp(log_b)."""
    return (log_b + torch.log(2 * x * (1 - x)) + (torch.logit(x) - mu).abs() * torch.exp(-log_b)).mean()


@dataclass(frozen=True)
class DiscreteVAEConfig:
    image_size: int = 256
    channels: int = 3
    n_hid: int = 256
    blocks_per_group: int = 2
    vocab_size: int = 8192
    n_init: int = 128
    quantizer: str = "gumbel"      # or "vq" (VectorQuantizer, codebook_lookup)
    kl_weight: float = 6.6         # beta: DALL-E's final weight of the KL to the uniform prior
    temperature: float = 1.0       # the Gumbel softmax's; anneal it in training (DALL-E: 1 -> 1/16)
    dead_code_threshold: float = 0.0  # "vq": codes whose EMA count falls below it restart from batch vectors

    def __post_init__(self):
        check_positive("DiscreteVAEConfig", self)
        if self.image_size % self.downsampling:
            raise ValueError(f"DiscreteVAEConfig.image_size ({self.image_size}) must be a multiple of the "
                             f"encoder's downsampling ({self.downsampling})")
        if self.n_hid % 4:
            raise ValueError(f"DiscreteVAEConfig.n_hid must be a multiple of 4 (the blocks' bottleneck), got {self.n_hid}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"DiscreteVAEConfig.quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
        if not self.dead_code_threshold >= 0 or (self.dead_code_threshold and self.quantizer != "vq"):
            raise ValueError("DiscreteVAEConfig.dead_code_threshold must be >= 0, and is for quantizer='vq' only "
                             f"(the Gumbel quantizer has no dead codes to restart), got {self.dead_code_threshold!r} "
                             f"with quantizer={self.quantizer!r}")

    @property
    def downsampling(self) -> int:
        return 8  # three 2x2 poolings between the four groups

    @property
    def grid(self) -> int:
        return self.image_size // self.downsampling


def _conv(n_in: int, n_out: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, kernel, padding=(kernel - 1) // 2)


class EncoderBlock(nn.Module):
    """id(x) + gain * (relu, conv3, relu, conv3, relu, conv3, relu, conv1)(x), bottleneck n_out / 4."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hid = n_out // 4
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(nn.ReLU(), _conv(n_in, hid, 3), nn.ReLU(), _conv(hid, hid, 3), nn.ReLU(),
                                      _conv(hid, hid, 3), nn.ReLU(), _conv(hid, n_out, 1))
        self.post_gain = 1 / n_layers ** 2

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DecoderBlock(nn.Module):
    """id(x) + gain * (relu, conv1, relu, conv3, relu, conv3, relu, conv3)(x), bottleneck n_out / 4."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hid = n_out // 4
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(nn.ReLU(), _conv(n_in, hid, 1), nn.ReLU(), _conv(hid, hid, 3), nn.ReLU(),
                                      _conv(hid, hid, 3), nn.ReLU(), _conv(hid, n_out, 3))
        self.post_gain = 1 / n_layers ** 2

    def forward(self, x: Tensor) -> Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _groups(block, widths: list, n_in: int, per_group: int, between) -> nn.Sequential:
    n_layers = len(widths) * per_group
    layers = []
    for g, width in enumerate(widths):
        for i in range(per_group):
            layers.append(block(n_in if i == 0 else width, width, n_layers))
        n_in = width
        if g < len(widths) - 1:
            layers.append(between())
    return nn.Sequential(*layers)


class DVAEOutput(NamedTuple):
    loss: Tensor           # () reconstruction NLL + the quantizer's loss
    reconstruction: Tensor  # () logit-Laplace NLL of the mapped pixels
    quantizer: QuantizerOutput
    mean: Tensor           # (B, C, H, W) the decoder's pixel means in [0, 1]


class DiscreteVAE(nn.Module):
    def __init__(self, config: DiscreteVAEConfig):
        super().__init__()
        if not isinstance(config, DiscreteVAEConfig):
            raise TypeError(f"config must be a DiscreteVAEConfig, got {type(config).__name__}")
        self.config = c = config
        widths = [c.n_hid * m for m in (1, 2, 4, 8)]
        vq = c.quantizer == "vq"
        self.encoder = nn.Sequential(_conv(c.channels, c.n_hid, 7),
                                     _groups(EncoderBlock, widths, c.n_hid, c.blocks_per_group,
                                             lambda: nn.MaxPool2d(2)),
                                     nn.ReLU(), _conv(widths[-1], c.n_init if vq else c.vocab_size, 1))
        self.quantizer = (VectorQuantizer(c.vocab_size, c.n_init, ema_decay=0.99, channels_first=True,
                                          dead_code_threshold=c.dead_code_threshold) if vq else
                          GumbelQuantizer(c.vocab_size, c.n_init, temperature=c.temperature, kl_weight=c.kl_weight,
                                          channels_first=True))
        self.decoder_bias = nn.Parameter(torch.zeros(c.n_init))  # the bias of OpenAI's 1x1 input convolution
        self.decoder = nn.Sequential(_groups(DecoderBlock, widths[::-1], c.n_init, c.blocks_per_group,
                                             lambda: nn.Upsample(scale_factor=2, mode="nearest")),
                                     nn.ReLU(), _conv(widths[0], 2 * c.channels, 1))

    def _check_pixels(self, pixels: Tensor) -> None:
        c = self.config
        if not isinstance(pixels, Tensor) or not pixels.is_floating_point() or pixels.dim() != 4 \
                or pixels.shape[1:] != (c.channels, c.image_size, c.image_size):
            raise ValueError(f"pixels must be float (B, {c.channels}, {c.image_size}, {c.image_size}) in [0, 1], got "
                             f"{getattr(pixels, 'dtype', type(pixels).__name__)} {tuple(getattr(pixels, 'shape', ()))}")

    def _decode(self, quantized: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, log_b) (B, C, H, W) from quantized (B, n_init, h, w)."""
        out = self.decoder(quantized + self.decoder_bias[:, None, None])
        return out.chunk(2, dim=1)

    def forward(self, pixels: Tensor) -> DVAEOutput:
        """pixels (B, C, H, W) in [0, 1]: the training loss and what it is made of."""
        self._check_pixels(pixels)
        x = map_pixels(pixels)
        q = self.quantizer(self.encoder(x))
        mu, log_b = self._decode(q.quantized)
        reconstruction = logit_laplace_nll(x.float(), mu.float(), log_b.float())
        return DVAEOutput(reconstruction + q.loss, reconstruction, q, unmap_pixels(torch.sigmoid(mu)))

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, H, W) in [0, 1] -> tokens (B, H/8, W/8) int64 (the most likely code, no noise)."""
        self._check_pixels(pixels)
        z = self.encoder(map_pixels(pixels))
        if self.config.quantizer == "gumbel":
            return z.argmax(dim=1)
        return codebook_lookup(z.permute(0, 2, 3, 1), self.quantizer.codebook.to(z.dtype))[0]  # the exact nearest code

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """tokens (B, h, w) int64 -> pixels (B, C, 8h, 8w) in [0, 1] (the decoder's means)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 3 or tokens.is_floating_point():
            raise ValueError(f"tokens must be (B, h, w) integers, got {getattr(tokens, 'dtype', None)} "
                             f"{tuple(getattr(tokens, 'shape', ()))}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"tokens must lie in [0, vocab_size={self.config.vocab_size}), got "
                             f"{int(tokens.min())} .. {int(tokens.max())}")
        codes = F.embedding(tokens, self.quantizer.codebook).permute(0, 3, 1, 2)  # (B, n_init, h, w)
        mu, _ = self._decode(codes.to(self.decoder_bias.dtype))
        return unmap_pixels(torch.sigmoid(mu))
