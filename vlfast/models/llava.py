"""LLaVA (Liu et al., 2023): CLIP's image tower, a projector, and a LLaMA decoder reading image
patches as tokens.

    pixels (N, 3, H, W) -> vision tower states at vision_feature_layer(s) (concatenated) -> drop [class]
      ("default") or keep it ("full") -> projector (linear_1, GELU, linear_2) -> (N, T, text hidden)
    input_ids (B, S) with image_token_index at the image positions -> embeddings, each image's T
      features written over its T placeholder tokens (images in order) -> Llama -> logits / loss

Attention over the sequence is causal, as LLaVA trains, or with image_attention="bidirectional" the
tokens of one image see each other (vlfast.masks.spans). vlfast.loaders maps transformers'
LlavaForConditionalGeneration checkpoints onto it and back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..generation import KVCache, generate as generate_tokens
from .clip import VisionConfig, VisionTower
from .llama import Llama, LlamaConfig

STRATEGIES = ("default", "full")
IMAGE_ATTENTION = ("causal", "bidirectional")


@dataclass(frozen=True)
class LlavaConfig:
    vision: VisionConfig
    text: LlamaConfig
    image_token_index: int = 32000
    vision_feature_layer: Union[int, tuple] = -2        # an int, or several (their states concatenated)
    vision_feature_select_strategy: str = "default"     # "default" drops the class token, "full" keeps it
    projector_bias: bool = True
    image_attention: str = "causal"                     # or "bidirectional": an image's tokens see each other

    def __post_init__(self):
        if not isinstance(self.vision, VisionConfig) or not isinstance(self.text, LlamaConfig):
            raise TypeError("LlavaConfig.vision / .text must be a VisionConfig / LlamaConfig")
        if self.vision_feature_select_strategy not in STRATEGIES:
            raise ValueError(f"LlavaConfig.vision_feature_select_strategy must be one of {STRATEGIES}, got "
                             f"{self.vision_feature_select_strategy!r}")
        if self.image_attention not in IMAGE_ATTENTION:
            raise ValueError(f"LlavaConfig.image_attention must be one of {IMAGE_ATTENTION}, got {self.image_attention!r}")
        if not 0 <= self.image_token_index < self.text.vocab_size:
            raise ValueError(f"LlavaConfig.image_token_index must be a token id in [0, {self.text.vocab_size}), got "
                             f"{self.image_token_index}")

    @property
    def feature_layers(self) -> tuple:
        layer = self.vision_feature_layer
        return tuple(layer) if isinstance(layer, (list, tuple)) else (layer,)

    @property
    def tokens_per_image(self) -> int:
        return self.vision.grid ** 2 + (self.vision_feature_select_strategy == "full")


class Projector(nn.Module):
    """LLaVA-1.5's "mlp2x_gelu": linear_2(GELU(linear_1(features)))."""

    def __init__(self, vision_dim: int, text_dim: int, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=bias)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class LLaVA(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        if not isinstance(config, LlavaConfig):
            raise TypeError(f"config must be a LlavaConfig, got {type(config).__name__}")
        self.config = config
        self.vision_tower = VisionTower(config.vision, None)
        self.projector = Projector(config.vision.width * len(config.feature_layers), config.text.hidden_size,
                                   config.projector_bias)
        self.language_model = Llama(config.text)
        with torch.no_grad():  # the tower's torch.empty tensors, as CLIP.init_weights sets them: never garbage
            # (NaN, or a different value on each rank, which FSDP2's per-rank shards would keep)
            nn.init.normal_(self.vision_tower.class_token, std=config.vision.width ** -0.5)
            nn.init.normal_(self.vision_tower.pos_embed, std=config.vision.width ** -0.5)

    def set_training_stage(self, stage: int) -> None:
        """LLaVA's two-stage recipe in one call: stage 1 trains the projector only (captions); stage 2 the
        projector and the language model (instructions). The vision tower stays frozen in both."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 (projector only) or 2 (projector + language model), got {stage!r}")
        self.vision_tower.requires_grad_(False)
        self.projector.requires_grad_(True)
        self.language_model.requires_grad_(stage == 2)

    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixel_values (N, C, H, W) -> (N, tokens_per_image, text hidden)."""
        states = self.vision_tower.layer_states(pixel_values, self.config.feature_layers)
        x = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        return self.projector(x)

    def embed(self, input_ids: Tensor, pixel_values: Optional[Tensor]) -> Tensor:
        """(B, S, H): token embeddings, with the images' features written over their placeholder tokens
        (image_token_index), images in row-major order of the placeholders."""
        is_image = input_ids == self.config.image_token_index
        embeds = self.language_model.embed(torch.where(is_image, 0, input_ids))
        count = int(is_image.sum()) if not torch.compiler.is_compiling() else None
        if pixel_values is None:
            if count:
                raise ValueError(f"input_ids hold {count} image tokens (image_token_index="
                                 f"{self.config.image_token_index}) but no pixel_values were given")
            return embeds
        features = self.image_features(pixel_values)
        if count is not None and count != features.shape[0] * features.shape[1]:
            raise ValueError(f"input_ids hold {count} image tokens but the {features.shape[0]} images give "
                             f"{features.shape[0]} x {features.shape[1]} = {features.shape[0] * features.shape[1]} "
                             "features; each image needs exactly tokens_per_image placeholders")
        return embeds.masked_scatter(is_image[..., None], features.to(embeds.dtype))

    def span_ids(self, input_ids: Tensor, length: Optional[int] = None) -> Optional[Tensor]:
        """(B, length or S) int32: each image's tokens one span (bidirectional image attention), else None."""
        if self.config.image_attention != "bidirectional":
            return None
        is_image = input_ids == self.config.image_token_index
        index = (is_image.long().cumsum(dim=1) - 1) // self.config.tokens_per_image  # image number within the row
        ids = torch.where(is_image, index, -1).to(torch.int32)
        return ids if length is None else F.pad(ids, (0, length - ids.shape[1]), value=-1)

    def _decoder_inputs(self, input_ids: Tensor, pixel_values: Optional[Tensor], packed: dict) -> dict:
        """The Llama's keyword arguments: merged embeddings (B, S, H) (packed: (T, H)) and span ids."""
        self.language_model._check_ids(input_ids if input_ids.dim() == 2 else input_ids[None])
        if packed.get("cu_seqlens") is not None:  # (T,) tokens of several sequences, their images in order
            if input_ids.dim() != 1:
                raise ValueError(f"packed input_ids must be (T,), got {tuple(input_ids.shape)}")
            spans = self.span_ids(input_ids[None])
            return dict(inputs_embeds=self.embed(input_ids[None], pixel_values)[0],
                        span_ids=None if spans is None else spans[0], **packed)
        return dict(inputs_embeds=self.embed(input_ids, pixel_values), span_ids=self.span_ids(input_ids), **packed)

    def forward(self, input_ids: Tensor, pixel_values: Optional[Tensor] = None, *,
                attention_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                max_seqlen: Optional[int] = None) -> Tensor:
        """Logits (B, S, V) for input_ids (B, S) with image placeholders and pixel_values (N, C, H, W); or
        packed: input_ids (T,) holding several sequences (cu_seqlens, max_seqlen) -> (T, V)."""
        packed = dict(attention_mask=attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.language_model(**self._decoder_inputs(input_ids, pixel_values, packed))

    def loss(self, input_ids: Tensor, labels: Tensor, pixel_values: Optional[Tensor] = None, *,
             attention_mask: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
             max_seqlen: Optional[int] = None) -> Tensor:
        """Mean next-token cross-entropy on labels (B, S) or packed (T,) (-100: no loss, e.g. prompts and
        image tokens); packed sequences never predict across their boundaries."""
        packed = dict(attention_mask=attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.language_model.loss(labels=labels, **self._decoder_inputs(input_ids, pixel_values, packed))

    @torch.no_grad()
    def generate(self, pixel_values: Optional[Tensor], input_ids: Tensor, max_new_tokens: int, *,
                 prompt_lengths: Optional[Tensor] = None, page_size: Optional[int] = None,
                 **sampling) -> tuple[Tensor, Tensor]:
        """(tokens (B, max_new_tokens), lengths (B,)) for right-padded prompts with their images, through a
        KV cache and vlfast.attention_decode; sampling: vlfast.generation.generate's options."""
        self.language_model._check_ids(input_ids)
        max_len = input_ids.shape[1] + max_new_tokens
        lm = self.language_model
        cache: KVCache = lm.new_cache(input_ids.shape[0], max_len, page_size)
        spans = self.span_ids(input_ids, max_len)
        prompt = {"embeds": self.embed(input_ids, pixel_values)}

        def step(tokens: Tensor, cache: KVCache, last: Optional[Tensor] = None) -> Tensor:
            embeds = prompt.pop("embeds", None)  # the prompt's merged embeddings, once
            if embeds is not None:
                return lm.step(None, cache, last, inputs_embeds=embeds, span_ids=spans)
            return lm.step(tokens, cache, last, span_ids=spans)

        return generate_tokens(step, input_ids, cache, max_new_tokens, prompt_lengths=prompt_lengths, **sampling)
