"""Cross-modal retrieval on top of vlfast.similarity_topk: recall@k and zero-shot classification at scale.

Every ranking is the exact top k of the float64 cosine similarities (ties to the lower index), computed in
blocks: no (images x texts) matrix is held.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .ops.similarity_topk import similarity_topk


def recall_at_k(image_embeds: Tensor, text_embeds: Tensor, text_to_image: Tensor,
                ks: Sequence[int] = (1, 5, 10)) -> dict:
    """{"text_to_image@k": fraction of texts whose image is among their k nearest images,
        "image_to_text@k": fraction of images with one of their captions among their k nearest texts}.

    image_embeds (Ni, D), text_embeds (Nt, D), text_to_image (Nt,) int64: the image each caption describes
    (several captions per image allowed). Similarity: cosine.
    """
    if text_to_image.shape != (text_embeds.shape[0],) or text_to_image.is_floating_point():
        raise ValueError(f"text_to_image must be ({text_embeds.shape[0]},) image indices, got "
                         f"{text_to_image.dtype} {tuple(text_to_image.shape)}")
    if text_to_image.numel() and not 0 <= int(text_to_image.min()) <= int(text_to_image.max()) < image_embeds.shape[0]:
        raise ValueError(f"text_to_image must index the {image_embeds.shape[0]} images")
    ks = sorted(set(ks))
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive ints, got {list(ks)}")
    out = {}
    k_img = min(ks[-1], image_embeds.shape[0])
    images, _ = similarity_topk(text_embeds, image_embeds, k_img, metric="cosine")  # (Nt, k)
    hit_rank = _first_hit(images == text_to_image[:, None])
    k_txt = min(ks[-1], text_embeds.shape[0])
    texts, _ = similarity_topk(image_embeds, text_embeds, k_txt, metric="cosine")  # (Ni, k)
    owner = text_to_image[texts]  # the image each retrieved caption belongs to
    image_rank = _first_hit(owner == torch.arange(image_embeds.shape[0], device=owner.device)[:, None])
    for k in ks:
        out[f"text_to_image@{k}"] = (hit_rank < k).double().mean().item()
        out[f"image_to_text@{k}"] = (image_rank < k).double().mean().item()
    return out


def _first_hit(hits: Tensor) -> Tensor:
    """(R,) the first column where hits (R, k) is True; k where none is."""
    k = hits.shape[1]
    position = torch.arange(k, device=hits.device).expand_as(hits)
    return torch.where(hits, position, k).amin(dim=1)


def zero_shot_topk(image_embeds: Tensor, class_embeds: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """(class indices (N, k), cosine similarities (N, k)) of each image's k most similar class embeddings
    (e.g. CLIP's prompt-averaged class texts), exactly, over any number of classes."""
    return similarity_topk(image_embeds, class_embeds, k, metric="cosine")
