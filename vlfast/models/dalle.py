"""DALL-E's transformer (Ramesh et al., 2021): one stream of text tokens then image tokens, sparse attention.

    text (B, T) ids, padded with a distinct token per position (text_vocab + position)
    image (B, G*G) dVAE tokens, row-major over the grid
    x = [text_embed + text_pos ; image_embed + row_embed + col_embed] -> pre-LN blocks -> LN
    position t predicts token t + 1: text positions through the text head, the last text position and the
    image positions through the image head; loss = text_weight * CE(text) + image_weight * CE(image)
    (1/8 and 7/8), both through vlfast.linear_cross_entropy (no logits held)

Layer i (1-based) attends with vlfast.masks.dalle over the text prefix and the image grid: column attention
where (i - 2) mod 4 = 0, row attention elsewhere, and the last layer convolutional (the paper's cycle).
generate() samples image tokens one by one with a KV cache (vlfast.attention_decode, the sparse masks
included), optionally with classifier-free guidance, and the dVAE decodes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import masks
from ..generation import KVCache, generate as generate_tokens, last_positions
from ..nn import SelfAttention
from ..ops.linear_cross_entropy import linear_cross_entropy
from ._config import check_positive


@dataclass(frozen=True)
class DALLEConfig:
    text_vocab: int = 16384
    text_len: int = 256
    image_vocab: int = 8192
    grid: int = 32
    dim: int = 1024
    layers: int = 24
    heads: int = 16
    conv_kernel: int = 11
    text_weight: float = 1 / 8
    image_weight: float = 7 / 8

    def __post_init__(self):
        check_positive("DALLEConfig", self)
        if self.dim % self.heads:
            raise ValueError(f"DALLEConfig.dim ({self.dim}) must be a multiple of heads ({self.heads})")

    @property
    def image_len(self) -> int:
        return self.grid * self.grid


def layer_kinds(layers: int) -> list:
    """The paper's sparse-attention cycle for layers 1..L: "column" where (i - 2) mod 4 = 0, else "row";
    the last layer "conv"."""
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, layers + 1)]
    kinds[-1] = "conv"
    return kinds


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor, mask: masks.Mask, cache=None) -> Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache=cache)
        return x + self.mlp(self.ln_2(x))


class DALLE(nn.Module):
    def __init__(self, config: DALLEConfig):
        super().__init__()
        if not isinstance(config, DALLEConfig):
            raise TypeError(f"config must be a DALLEConfig, got {type(config).__name__}")
        self.config = c = config
        self.text_embed = nn.Embedding(c.text_vocab + c.text_len, c.dim)  # + a padding token per position
        self.text_pos = nn.Parameter(torch.randn(c.text_len, c.dim) * 0.02)
        self.image_embed = nn.Embedding(c.image_vocab, c.dim)
        self.row_embed = nn.Parameter(torch.randn(c.grid, c.dim) * 0.02)
        self.col_embed = nn.Parameter(torch.randn(c.grid, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads) for _ in range(c.layers))
        self.masks = [masks.dalle(c.text_len, c.grid, c.grid, kind, kernel=c.conv_kernel)
                      for kind in layer_kinds(c.layers)]
        self.ln_f = nn.LayerNorm(c.dim)
        self.text_head = nn.Linear(c.dim, c.text_vocab + c.text_len, bias=False)
        self.image_head = nn.Linear(c.dim, c.image_vocab, bias=False)

    # --- inputs -----------------------------------------------------------------------------------
    def pad_text(self, text: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """(B, <= T) ids -> (B, T): positions past each caption's length (lengths, default: where the ids
        run out) get their position's own padding token, text_vocab + position."""
        c = self.config
        if text.dim() != 2 or text.shape[1] > c.text_len or text.is_floating_point():
            raise ValueError(f"text must be (B, S) token ids with S <= text_len={c.text_len}, got "
                             f"{text.dtype} {tuple(text.shape)}")
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= c.text_vocab):
            raise ValueError(f"text ids must lie in [0, text_vocab={c.text_vocab}), got {int(text.min())} .. "
                             f"{int(text.max())}")
        out = F.pad(text, (0, c.text_len - text.shape[1]))
        lengths = torch.full((text.shape[0],), text.shape[1], device=text.device) if lengths is None else lengths
        pos = torch.arange(c.text_len, device=text.device)
        return torch.where(pos[None] < lengths[:, None], out, c.text_vocab + pos)

    def _check_image(self, image: Tensor) -> None:
        c = self.config
        if image.dim() != 2 or image.shape[1] > c.image_len or image.is_floating_point():
            raise ValueError(f"image must be (B, <= {c.image_len}) dVAE token ids, got {image.dtype} {tuple(image.shape)}")
        if image.numel() and (int(image.min()) < 0 or int(image.max()) >= c.image_vocab):
            raise ValueError(f"image codes must lie in [0, image_vocab={c.image_vocab}), got {int(image.min())} .. "
                             f"{int(image.max())}")

    def embed_image(self, image: Tensor, start: Tensor) -> Tensor:
        """image (B, S) codes of grid cells start_b .. start_b + S - 1 -> (B, S, dim)."""
        cell = start.long()[:, None] + torch.arange(image.shape[1], device=image.device)
        g = self.config.grid
        return self.image_embed(image) + self.row_embed[cell // g] + self.col_embed[cell % g]

    def embed(self, text: Tensor, image: Tensor) -> Tensor:
        """text (B, T) padded ids, image (B, S <= G*G) codes -> (B, T + S, dim)."""
        self._check_image(image)
        zero = torch.zeros(text.shape[0], dtype=torch.long, device=text.device)
        return torch.cat([self.text_embed(text) + self.text_pos, self.embed_image(image, zero)], dim=1)

    # --- training -----------------------------------------------------------------------------------
    def hidden_states(self, x: Tensor) -> Tensor:
        for block, mask in zip(self.blocks, self.masks):
            x = block(x, mask)
        return self.ln_f(x)

    def loss(self, text: Tensor, image: Tensor) -> Tensor:
        """text (B, T) padded ids (pad_text), image (B, G*G) codes -> text_weight * CE(text) + image_weight * CE(image),
        each the mean over its predictions: positions 0..T-2 predict text 1..T-1, positions T-1..T+N-2 the image."""
        c = self.config
        if text.shape[1:] != (c.text_len,) or image.shape[1:] != (c.image_len,):
            raise ValueError(f"loss takes text (B, {c.text_len}) (see pad_text) and image (B, {c.image_len}), got "
                             f"{tuple(text.shape)} and {tuple(image.shape)}")
        h = self.hidden_states(self.embed(text, image))
        text_h, image_h = h[:, :c.text_len - 1], h[:, c.text_len - 1:-1]
        text_loss = linear_cross_entropy(text_h.reshape(-1, c.dim), self.text_head.weight, text[:, 1:].reshape(-1))
        image_loss = linear_cross_entropy(image_h.reshape(-1, c.dim), self.image_head.weight, image.reshape(-1))
        return c.text_weight * text_loss + c.image_weight * image_loss

    def forward(self, text: Tensor, image: Tensor) -> Tensor:
        """The training loss (see loss): what DistributedDataParallel and fully_shard call."""
        return self.loss(text, image)

    # --- sampling -----------------------------------------------------------------------------------
    def step(self, tokens: Tensor, cache: KVCache, text: Optional[Tensor] = None,
             last: Optional[Tensor] = None) -> Tensor:
        """Image-token logits (B, S, image_vocab): for the padded text prompt (text given; tokens ignored),
        or for image tokens (B, S) appended at the cache's positions; (B, 1, image_vocab) at the positions
        last (B,) when given."""
        c = self.config
        if text is not None:
            x = self.text_embed(text) + self.text_pos
        else:
            x = self.embed_image(tokens, cache.seqlens - c.text_len)
        for i, (block, mask) in enumerate(zip(self.blocks, self.masks)):
            x = block(x, mask, cache=cache.layer(i))
        return self.image_head(self.ln_f(last_positions(x, last)))

    @torch.no_grad()
    def generate(self, text: Tensor, num_images: int = 1, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 top_p: Optional[float] = None, cond_scale: Optional[float] = None,
                 generator: Optional[torch.Generator] = None) -> Tensor:
        """text (B, T) padded ids (pad_text) -> image codes (B * num_images, G*G), each image's tokens sampled
        one by one with a KV cache; cond_scale: classifier-free guidance against all-padding text."""
        c = self.config
        if text.shape[1:] != (c.text_len,):
            raise ValueError(f"generate takes padded text (B, {c.text_len}) (see pad_text), got {tuple(text.shape)}")
        prompt = text.repeat_interleave(num_images, dim=0)
        if cond_scale is not None:
            blank = (c.text_vocab + torch.arange(c.text_len, device=text.device)).expand_as(prompt)
            prompt = torch.cat([prompt, blank])
        p = self.image_embed.weight
        cache = KVCache(c.layers, prompt.shape[0], c.heads, c.dim // c.heads, c.text_len + c.image_len,
                        dtype=p.dtype, device=p.device)
        first = {"text": prompt}

        def step(tokens: Tensor, cache: KVCache, last: Optional[Tensor] = None) -> Tensor:
            return self.step(tokens, cache, text=first.pop("text", None), last=last)

        tokens, _ = generate_tokens(step, prompt, cache, c.image_len, temperature=temperature, top_k=top_k,
                                    top_p=top_p, cfg_scale=cond_scale, generator=generator, sync_every=0)
        return tokens[:text.shape[0] * num_images]


@torch.no_grad()
def rerank(images: Tensor, captions: Tensor, clip, num_images: int, attention_mask: Optional[Tensor] = None) -> tuple:
    """(best (B,) index of the best of each caption's num_images images, scores (B, num_images)): CLIP's
    cosine similarity between each caption (B, S) and its images (B * num_images, C, H, W), grouped in order."""
    image_features = F.normalize(clip.encode_image(images), dim=-1)
    text_features = F.normalize(clip.encode_text(captions, attention_mask=attention_mask), dim=-1)
    scores = (image_features.view(captions.shape[0], num_images, -1) * text_features[:, None]).sum(-1)
    return scores.argmax(dim=1), scores
