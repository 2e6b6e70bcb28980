"""CLIP (Radford et al., 2021): a ViT image tower and a causal text tower meeting in one embedding space.

    image (B, 3, H, W) -> patches + [class] + positions -> LN -> blocks -> LN([class]) -> proj -> (B, E)
    text  (B, S) ids   -> tokens + positions -> causal blocks -> LN(token at EOS) -> proj -> (B, E)
    forward -> (normalised image features, normalised text features, exp(logit_scale))

forward returns what open_clip's CLIP returns, so `vlfast.nn.ClipLoss()(*model(images, ids))` is
the training loss. Attention is vlfast.nn.SelfAttention: bidirectional for images, causal for text;
a padded text batch is packed once by its real tokens (vlfast.attention_varlen), so padding costs
no work in any layer. Parameter names follow OpenAI's layout (in_proj as one qkv
Linear); vlfast.loaders maps transformers' and OpenAI's checkpoints onto them.

Tokenisation and image preprocessing are the caller's: the text tower takes token ids (and
optionally transformers' attention_mask), the image tower takes normalised pixels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._config import check_positive

from .. import masks
from ..nn.attention import SelfAttention

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh")


def _check_tower(owner: str, cfg) -> None:
    check_positive(owner, cfg)
    if cfg.width % cfg.heads:
        raise ValueError(f"{owner}.width ({cfg.width}) must be a multiple of {owner}.heads ({cfg.heads})")
    if cfg.act not in ACTIVATIONS:
        raise ValueError(f"{owner}.act must be one of {ACTIVATIONS}, got {cfg.act!r}")
    if not cfg.ln_eps > 0:
        raise ValueError(f"{owner}.ln_eps must be > 0, got {cfg.ln_eps!r}")


@dataclass(frozen=True)
class VisionConfig:
    """The image tower: a ViT over image_size / patch_size squared patches plus a class token."""
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    channels: int = 3
    act: str = "quick_gelu"
    ln_eps: float = 1e-5

    def __post_init__(self):
        _check_tower("VisionConfig", self)
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid ** 2 + 1


@dataclass(frozen=True)
class TextConfig:
    """The text tower: a causal transformer over at most context_length tokens.

    eos_token_id: None pools at the largest token id of each sequence (OpenAI's tokenizer puts its
    end-of-text token, the largest id, there); an int pools at the first occurrence of that id
    (transformers' convention for tokenizers whose EOS is not the largest id).
    """
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    eos_token_id: Optional[int] = None

    def __post_init__(self):
        _check_tower("TextConfig", self)
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, int) or not 0 <= eos < self.vocab_size):
            raise ValueError(f"TextConfig.eos_token_id must be None or an int in [0, vocab_size={self.vocab_size}), "
                             f"got {eos!r}")


@dataclass(frozen=True)
class CLIPConfig:
    """Both towers, the shared embedding width and the initial log temperature (log(1 / 0.07))."""
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = math.log(1 / 0.07)

    def __post_init__(self):
        check_positive("CLIPConfig", self)
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.text, TextConfig):
            raise TypeError("CLIPConfig.vision / .text must be a VisionConfig / TextConfig")

    @staticmethod
    def preset(name: str, **overrides) -> "CLIPConfig":
        """A named configuration (PRESETS), with top-level fields replaced by `overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown CLIP preset {name!r}; known: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


def _openai_vit(embed_dim: int, image_size: int, patch_size: int, vision_width: int, vision_layers: int,
                text_width: int) -> CLIPConfig:
    # OpenAI's ViTs: 64-wide heads, MLP 4x wide, QuickGELU, a 12-layer text tower over 77 tokens.
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vision_width, layers=vision_layers,
                            heads=vision_width // 64, mlp_dim=4 * vision_width),
        text=TextConfig(width=text_width, layers=12, heads=text_width // 64, mlp_dim=4 * text_width))


PRESETS = {
    "ViT-B/32": _openai_vit(512, 224, 32, 768, 12, 512),
    "ViT-B/16": _openai_vit(512, 224, 16, 768, 12, 512),
    "ViT-L/14": _openai_vit(768, 224, 14, 1024, 24, 768),
    "ViT-L/14-336": _openai_vit(768, 336, 14, 1024, 24, 768),
    # Test sizes: seconds on a CPU.
    "test-tiny": CLIPConfig(embed_dim=16,
                            vision=VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4, mlp_dim=64),
                            text=TextConfig(vocab_size=99, context_length=16, width=32, layers=2, heads=4, mlp_dim=64)),
    "test-small": CLIPConfig(embed_dim=64,
                             vision=VisionConfig(image_size=32, patch_size=4, width=128, layers=4, heads=4,
                                                 mlp_dim=512),
                             text=TextConfig(vocab_size=1000, context_length=32, width=128, layers=4, heads=4,
                                             mlp_dim=512)),
}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's CLIP was trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = activation(act)
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_dim: int, act: str, ln_eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=ln_eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, mlp_dim, act)

    def forward(self, x: Tensor, mask: Optional[masks.Mask] = None, **packed) -> Tensor:
        """x (B, S, W), or packed (T, W) with packed = dict(cu_seqlens=..., max_seqlen=...)."""
        x = x + self.attn(self.ln_1(x), mask, **packed)
        return x + self.mlp(self.ln_2(x))


def _blocks(cfg) -> nn.ModuleList:
    return nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_dim, cfg.act, cfg.ln_eps) for _ in range(cfg.layers))


class VisionTower(nn.Module):
    """The ViT image tower; embed_dim None builds it without the projection (LLaVA reads its layers)."""

    def __init__(self, cfg: VisionConfig, embed_dim: Optional[int]):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.channels, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_token = nn.Parameter(torch.empty(cfg.width))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_positions, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.blocks = _blocks(cfg)
        self.ln_post = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False) if embed_dim is not None else None

    def _check(self, pixels: Tensor) -> None:
        c, size = self.cfg.channels, self.cfg.image_size
        if not isinstance(pixels, Tensor) or not pixels.is_floating_point():
            raise TypeError(f"image must be a floating-point tensor (B, {c}, {size}, {size}), got "
                            f"{pixels.dtype if isinstance(pixels, Tensor) else type(pixels).__name__}")
        if pixels.dim() != 4 or pixels.shape[1:] != (c, size, size):
            raise ValueError(f"image must be (B, {c}, {size}, {size}), got {tuple(pixels.shape)}")

    def _tokens(self, pixels: Tensor) -> Tensor:
        """(B, 1 + grid², W): [class] + patches + positions, after ln_pre."""
        self._check(pixels)
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(2).transpose(1, 2)  # (B, grid², W)
        # The residual stream stays in the parameters' dtype (float32 under autocast), as in transformers.
        cls = self.class_token.expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, x.to(cls.dtype)], dim=1) + self.pos_embed)

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels (B, C, H, W), normalised as the checkpoint expects -> (B, embed_dim)."""
        if self.proj is None:
            raise ValueError("this vision tower has no projection (embed_dim=None); read its layers with layer_states")
        x = self._tokens(pixels)
        for block in self.blocks:
            x = block(x)
        return self.proj(self.ln_post(x[:, 0]))

    def layer_states(self, pixels: Tensor, layers: tuple) -> list:
        """[(B, 1 + grid², W)] for each index of `layers` into the states [after ln_pre, after block 1, ...,
        after block L] (Python indexing: -1 is the last block's output, -2 the one before)."""
        count = len(self.blocks) + 1
        wanted = [i % count for i in layers if -count <= i < count]
        if len(wanted) != len(layers):
            raise ValueError(f"vision feature layers must index the {count} states (-{count} .. {count - 1}), "
                             f"got {list(layers)}")
        x = self._tokens(pixels)
        states = {0: x} if 0 in wanted else {}
        for i, block in enumerate(self.blocks[:max(wanted)], start=1):
            x = block(x)
            if i in wanted:
                states[i] = x
        return [states[i] for i in wanted]


def eos_positions(ids: Tensor, eos_token_id: Optional[int]) -> Tensor:
    """(B,) index of the token each sequence is pooled at (see TextConfig.eos_token_id)."""
    if eos_token_id is None:
        return ids.argmax(dim=-1)  # the first occurrence of the largest id
    is_eos = ids == eos_token_id
    # A row without the token would silently pool at position 0; this check syncs with the device.
    if not torch.compiler.is_compiling() and not bool(is_eos.any(dim=-1).all()):
        rows = (~is_eos.any(dim=-1)).nonzero().flatten().tolist()
        raise ValueError(f"text: rows {rows[:10]} contain no eos_token_id={eos_token_id}, where the text "
                         "tower pools; end every sequence with it (or use eos_token_id=None to pool at the "
                         "largest id)")
    return is_eos.int().argmax(dim=-1)


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.blocks = _blocks(cfg)
        self.ln_final = nn.LayerNorm(cfg.width, eps=cfg.ln_eps)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)

    def _check(self, ids: Tensor, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
        """The key padding mask as bool (True = a real token), or None."""
        if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text must be an int64 / int32 tensor of token ids (B, S), got "
                            f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
        if ids.dim() != 2 or not 1 <= ids.shape[1] <= self.cfg.context_length:
            raise ValueError(f"text must be (B, S) with 1 <= S <= context_length={self.cfg.context_length}, "
                             f"got {tuple(ids.shape)}")
        if attention_mask is None:
            return None
        if attention_mask.shape != ids.shape:
            raise ValueError(f"attention_mask must have the shape of text {tuple(ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool or integer (1 = token, 0 = padding), got "
                            f"{attention_mask.dtype}")
        return attention_mask.to(device=ids.device, dtype=torch.bool)

    def forward(self, ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        """ids (B, S), attention_mask (B, S) or None (1 = token, 0 = padding) -> (B, embed_dim)."""
        padding = self._check(ids, attention_mask)
        # An id outside the table would index out of bounds in the embedding; this check syncs with the device.
        if not torch.compiler.is_compiling() and ids.numel():
            low, high = (int(x) for x in torch.stack([ids.min(), ids.max()]).tolist())
            if low < 0 or high >= self.cfg.vocab_size:
                raise ValueError(f"text (input_ids) must hold token ids in [0, vocab_size={self.cfg.vocab_size}), "
                                 f"got ids from {low} to {high}")
        x = self.token_embed(ids) + self.pos_embed[: ids.shape[1]]
        eos = eos_positions(ids, self.cfg.eos_token_id)
        rows = torch.arange(x.shape[0], device=x.device)
        if padding is None:
            for block in self.blocks:
                x = block(x, masks.causal())
            pooled = x[rows, eos]
        else:
            pooled = self._packed_blocks(x, padding, eos)
        return self.proj(self.ln_final(pooled))  # LN is per token: normalising only the pooled one is the same

    def _packed_blocks(self, x: Tensor, padding: Tensor, eos: Tensor) -> Tensor:
        """The blocks over the real tokens only, packed once for the whole tower -> pooled (B, W).

        x (B, S, W), padding (B, S) bool (True = a real token), eos (B,) the pooled positions.
        Causal over the packed tokens of one sequence is causal + key padding over the padded row.
        """
        rows = torch.arange(x.shape[0], device=x.device)
        # The pooled token must be real: padding never runs through the blocks. Syncs with the device.
        if not torch.compiler.is_compiling() and not bool(padding[rows, eos].all()):
            bad = (~padding[rows, eos]).nonzero().flatten().tolist()
            raise ValueError(f"attention_mask: rows {bad[:10]} are pooled at a padded position (the "
                             "token the text tower pools at must have attention_mask 1)")
        lengths = padding.sum(dim=1)
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
        packed_index = padding.flatten().cumsum(0).view_as(padding) - 1  # (B, S) a real token's row in x[padding]
        x = x[padding]  # (T, W), real tokens in order
        for block in self.blocks:
            x = block(x, masks.causal(), cu_seqlens=cu_seqlens, max_seqlen=padding.shape[1])
        return x[packed_index[rows, eos]]


def _init_blocks(blocks: nn.ModuleList, width: int) -> None:
    # OpenAI's initialisation; biases start at zero.
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * len(blocks)) ** -0.5
    fc_std = (2 * width) ** -0.5
    for block in blocks:
        for linear, std in ((block.attn.qkv, attn_std), (block.attn.out, proj_std), (block.mlp.fc, fc_std),
                            (block.mlp.proj, proj_std)):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)


class CLIP(nn.Module):
    """CLIP's two towers and the learned temperature; see the module docstring for shapes."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
        self.config = config
        self.visual = VisionTower(config.vision, config.embed_dim)
        self.text = TextTower(config.text, config.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.init_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CLIP":
        return cls(CLIPConfig.preset(name, **overrides))

    @torch.no_grad()
    def init_weights(self) -> None:
        v, t = self.visual, self.text
        nn.init.normal_(v.class_token, std=v.cfg.width ** -0.5)
        nn.init.normal_(v.pos_embed, std=v.cfg.width ** -0.5)
        nn.init.normal_(v.proj.weight, std=v.cfg.width ** -0.5)
        nn.init.normal_(t.token_embed.weight, std=0.02)
        nn.init.normal_(t.pos_embed, std=0.01)
        nn.init.normal_(t.proj.weight, std=t.cfg.width ** -0.5)
        _init_blocks(v.blocks, v.cfg.width)
        _init_blocks(t.blocks, t.cfg.width)
        self.logit_scale.fill_(self.config.logit_scale_init)

    def encode_image(self, image: Tensor, normalize: bool = False) -> Tensor:
        """image (B, C, H, W) -> features (B, embed_dim), unit-norm if normalize."""
        features = self.visual(image)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text: Tensor, normalize: bool = False, attention_mask: Optional[Tensor] = None) -> Tensor:
        """text ids (B, S) [, attention_mask (B, S)] -> features (B, embed_dim), unit-norm if normalize."""
        features = self.text(text, attention_mask)
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image: Optional[Tensor] = None, text: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, *, output_dict: bool = False):
        """(image_features, text_features, logit_scale.exp()) as open_clip's CLIP returns them.

        Features are unit-norm (None for a tower given no input); output_dict=True returns
        {"image_features", "text_features", "logit_scale"} instead.
        """
        image_features = self.encode_image(image, normalize=True) if image is not None else None
        text_features = (self.encode_text(text, normalize=True, attention_mask=attention_mask)
                         if text is not None else None)
        scale = self.logit_scale.exp()
        if output_dict:
            return {"image_features": image_features, "text_features": text_features, "logit_scale": scale}
        return image_features, text_features, scale
