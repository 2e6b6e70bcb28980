"""Cross-modal retrieval on top of vlfast.similarity_topk: recall@k, zero-shot classification at scale,
and CLIP's embedding arithmetic (an image's embedding minus one text's plus another's, searched among images).

Every ranking is the exact top k of the float64 cosine similarities (ties to the lower index), computed in
blocks: no (images x texts) matrix is held.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
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


def arithmetic_query(image_embeds: Tensor, minus_embeds: Tensor, plus_embeds: Tensor) -> Tensor:
    """unit(unit(image) - unit(minus) + unit(plus)) per row: (N, D) from three (N, D) (or (1, D), broadcast)
    embeddings, in float32 (float64 stays float64). Each term is normalised first, so a text counts as
    much as the image whatever its embedding's norm."""
    terms = {"image_embeds": image_embeds, "minus_embeds": minus_embeds, "plus_embeds": plus_embeds}
    for name, x in terms.items():
        if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
            raise ValueError(f"{name} must be a floating (N, D) tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds non-finite values")
    d = image_embeds.shape[1]
    if minus_embeds.shape[1] != d or plus_embeds.shape[1] != d:
        raise ValueError(f"the embeddings must share one width: image {d}, minus {minus_embeds.shape[1]}, "
                         f"plus {plus_embeds.shape[1]}")
    dtype = torch.float64 if image_embeds.dtype == torch.float64 else torch.float32
    unit = [F.normalize(x.to(dtype), dim=1) for x in terms.values()]
    return F.normalize(unit[0] - unit[1] + unit[2], dim=1)


@torch.no_grad()
def embedding_arithmetic(model, images: Tensor, minus: Tensor, plus: Tensor, gallery: Tensor, k: int = 8,
                         minus_mask: Optional[Tensor] = None, plus_mask: Optional[Tensor] = None
                         ) -> tuple[Tensor, Tensor]:
    """The seed's "multimodal vector space arithmetic": the k gallery images nearest (cosine) to
    image - text(minus) + text(plus), e.g. a red circle - "red" + "blue" -> blue circles.

    model: a vlfast.models.CLIP (encode_image, encode_text); images (N, C, H, W); minus / plus token ids
    (N, S) or (1, S) with their attention masks (or None); gallery (M, D): the searched images' embeddings
    (model.encode_image of them). Returns (indices (N, k) into the gallery, cosine similarities (N, k)),
    the exact top k, ties to the lower index.
    """
    query = arithmetic_query(model.encode_image(images), model.encode_text(minus, attention_mask=minus_mask),
                             model.encode_text(plus, attention_mask=plus_mask))
    return similarity_topk(query, gallery.to(query.dtype), k, metric="cosine")
