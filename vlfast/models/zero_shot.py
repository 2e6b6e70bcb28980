"""Zero-shot classification as in the CLIP paper: class names x prompt templates -> a linear classifier.

Each class's prompts ("a photo of a {}.", ...) are embedded by the text tower, normalised, averaged
and normalised again; an image's class is the row with the largest cosine similarity.

Tokenisation is the caller's: pass any callable that maps a list of strings to token ids, e.g.
  open_clip:     tokenizer = open_clip.get_tokenizer("ViT-B-32")              # -> LongTensor (N, 77)
  transformers:  tok = CLIPTokenizer.from_pretrained(...)
                 tokenizer = lambda texts: tok(texts, padding=True, return_tensors="pt")
                                                            # -> {"input_ids", "attention_mask"}
It must return a tensor of ids (N, S), or a mapping with "input_ids" (and optionally "attention_mask").
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .clip import CLIP

Template = Union[str, Callable[[str], str]]


def _prompts(class_name: str, templates: Sequence[Template]) -> list:
    return [t(class_name) if callable(t) else t.format(class_name) for t in templates]


def _tokenize(tokenizer: Callable, texts: list, device: torch.device):
    """(ids (N, S), attention_mask (N, S) or None) on `device`, from whatever the tokenizer returns."""
    out = tokenizer(texts)
    mask = None
    if isinstance(out, Mapping):
        if "input_ids" not in out:
            raise TypeError(f"tokenizer returned a mapping without 'input_ids' (keys: {sorted(out)})")
        ids, mask = out["input_ids"], out.get("attention_mask")
    else:
        ids = out
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != len(texts):
        raise TypeError(f"tokenizer must return token ids as a tensor ({len(texts)}, S) for {len(texts)} texts "
                        f"(a transformers tokenizer needs return_tensors='pt'), got "
                        f"{tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
    return ids.to(device), None if mask is None else mask.to(device)


@torch.no_grad()
def zero_shot_weights(model: CLIP, class_names: Sequence[str], templates: Sequence[Template],
                      tokenizer: Callable, *, batch_size: int = 256) -> Tensor:
    """(C, embed_dim) unit rows: each class's mean normalised text embedding over the templates, normalised.

    templates: format strings with one "{}" for the class name, or callables name -> prompt.
    """
    if not class_names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty: pass at least one prompt such as 'a photo of a {}.'")
    device = model.logit_scale.device
    prompts = [p for name in class_names for p in _prompts(name, templates)]
    features = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = _tokenize(tokenizer, prompts[start:start + batch_size], device)
        features.append(model.encode_text(ids, normalize=True, attention_mask=mask))
    per_prompt = torch.cat(features).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


class ZeroShotClassifier(nn.Module):
    """A CLIP model and its class embeddings (C, embed_dim); forward gives logits, predict the class."""

    def __init__(self, model: CLIP, class_weights: Tensor, class_names: Sequence[str] = ()):
        super().__init__()
        if class_weights.dim() != 2 or class_weights.shape[1] != model.config.embed_dim:
            raise ValueError(f"class_weights must be (classes, embed_dim={model.config.embed_dim}), "
                             f"got {tuple(class_weights.shape)}")
        if class_names and len(class_names) != class_weights.shape[0]:
            raise ValueError(f"{len(class_names)} class_names for {class_weights.shape[0]} class_weights rows")
        self.model = model
        self.class_names = list(class_names)
        self.register_buffer("class_weights", class_weights)

    @classmethod
    def from_prompts(cls, model: CLIP, class_names: Sequence[str], templates: Sequence[Template],
                     tokenizer: Callable, *, batch_size: int = 256) -> "ZeroShotClassifier":
        weights = zero_shot_weights(model, class_names, templates, tokenizer, batch_size=batch_size)
        return cls(model, weights, class_names)

    def forward(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> logits (B, classes): exp(logit_scale) * cosine similarity."""
        features = self.model.encode_image(images, normalize=True)
        return self.model.logit_scale.exp() * features @ self.class_weights.to(features.dtype).t()

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        """images (B, C, H, W) -> (B,) class indices."""
        return self.forward(images).argmax(dim=-1)
