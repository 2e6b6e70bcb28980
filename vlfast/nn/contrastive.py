"""ClipLoss and SigLipLoss: drop-in replacements for open_clip's loss modules of the same names.

Same constructor arguments, forward signatures, return values and distributed semantics as
open_clip-torch 3.3.0, but every block of logits goes through vlfast.clip_loss, so no N x M logits
are materialised. Differences: the loss is float32 for float16 / bfloat16 / float32 features
(float64 for float64); cache_labels is accepted but has no effect (vlfast builds no label tensors);
the logits helpers (get_logits, get_ground_truth) do not exist, since the point is never to form them.
"""
from __future__ import annotations

import operator
from typing import Optional, Union

import torch.distributed as dist
from torch import Tensor, nn

from .._dispatch import IMPLS
from ..ops.clip_loss import clip_loss
from .distributed import (all_gather_with_grad, all_reduce_with_grad, exchange, exchange_bidir,
                          gather_features, import_horovod)

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")

Scalar = Union[Tensor, float]


def _check_rank(rank, world_size) -> tuple[int, int]:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not hasattr(value, "__index__"):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    world_size, rank = operator.index(world_size), operator.index(rank)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must satisfy 0 <= rank < world_size ({world_size}), got {rank}")
    return rank, world_size


def _check_impl(impl: str) -> str:
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"impl must be one of {('auto',) + IMPLS}, got {impl!r}")
    return impl


def _check_process_group(module: str, rank: int, world_size: int) -> None:
    # A rank / world_size that disagree with the process group would silently pair the wrong blocks.
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{module}(world_size={world_size}) needs torch.distributed.init_process_group() "
                           "to have been called first")
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"{module} was built with rank={rank}, world_size={world_size} but the default "
                         f"process group has rank {dist.get_rank()} of {dist.get_world_size()}")


class ClipLoss(nn.Module):
    """CLIP's symmetric InfoNCE loss, optionally over the batches of all ranks.

    forward(image_features (N, D), text_features (N, D), logit_scale (), logit_bias () or None,
    output_dict=False) -> loss () or {"contrastive_loss": loss}. logit_scale is the multiplier itself
    (already exponentiated); logit_bias shifts every logit and so does not change this loss.

    world_size > 1 gathers every rank's N pairs (all ranks must pass the same N):
      local_loss=False: each rank computes the loss of the whole (world_size * N) batch;
      local_loss=True: each rank computes only its own rows: its images against all texts and its
        texts against all images, averaged;
      gather_with_grad: gradients flow through the gathered features to every rank; without it only
        this rank's own features get gradients (from the rows and columns they sit in).
    cache_labels has no effect. impl is passed to vlfast.clip_loss.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, impl: str = "auto"):
        super().__init__()
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.use_horovod = use_horovod
        self.impl = _check_impl(impl)
        if use_horovod:
            import_horovod()  # fail now, not at the first distributed step

    def _softmax(self, rows: Tensor, cols: Tensor, logit_scale: Scalar, logit_bias: Optional[Scalar],
                 **layout) -> Tensor:
        return clip_loss(rows, cols, logit_scale, logit_bias, kind="softmax", impl=self.impl, **layout)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Optional[Scalar] = None, output_dict: bool = False):
        if self.world_size == 1:
            loss = self._softmax(image_features, text_features, logit_scale, logit_bias)
        else:
            if not self.use_horovod:
                _check_process_group("ClipLoss", self.rank, self.world_size)
            all_image, all_text = gather_features(
                image_features, text_features, local_loss=self.local_loss,
                gather_with_grad=self.gather_with_grad, rank=self.rank, world_size=self.world_size,
                use_horovod=self.use_horovod)
            if self.local_loss:
                # Rows are this rank's pairs; their positives sit at rank * N in the gathered columns.
                offset = self.rank * image_features.shape[0]
                loss = (self._softmax(image_features, all_text, logit_scale, logit_bias,
                                      symmetric=False, positive_offset=offset)
                        + self._softmax(text_features, all_image, logit_scale, logit_bias,
                                        symmetric=False, positive_offset=offset)) / 2
            else:
                loss = self._softmax(all_image, all_text, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss (Zhai et al., 2023), optionally against the texts of all ranks.

    forward(image_features (N, D), text_features (N, D), logit_scale (), logit_bias () or None,
    output_dict=False) -> loss () or {"contrastive_loss": loss}: the sum over this rank's images and
    every rank's texts of -log sigmoid(+-logit), divided by N (positives only against this rank's texts).

    dist_impl picks how texts travel between ranks (world_size > 1; all ranks pass the same N):
      "bidir" (default): pass blocks both ways round the ring, about world_size / 2 steps;
      "shift": pass blocks one way round the ring, world_size - 1 steps;
      "reduce": one all-reduce per rank; "gather": one all-gather of every rank's texts.
    Gradients flow back to the rank that owns each text block in every mode.
    cache_labels has no effect. impl is passed to vlfast.clip_loss.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, impl: str = "auto"):
        super().__init__()
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of {DIST_IMPLS}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.impl = _check_impl(impl)

    def _block(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
               logit_bias: Optional[Scalar], positives: bool) -> Tensor:
        return clip_loss(image_features, text_features, logit_scale, logit_bias, kind="sigmoid",
                         positive_offset=0 if positives else None, impl=self.impl)

    def _texts_of_other_ranks(self, text_features: Tensor):
        """Yield the (N, D) text block of every other rank once, each as soon as it arrives."""
        rank, world = self.rank, self.world_size
        left, right = (rank - 1) % world, (rank + 1) % world
        if self.dist_impl == "shift":
            for _ in range(world - 1):
                text_features = exchange(text_features, left, right)
                yield text_features
        elif self.dist_impl == "bidir":
            to_left = to_right = text_features
            rounds, odd = divmod(world - 1, 2)
            for _ in range(rounds):
                # What came from the right moves on leftwards next round, and vice versa.
                to_left, to_right = exchange_bidir(to_left, to_right, left, right)
                yield to_left
                yield to_right
            if odd:
                yield exchange(to_right, left, right)
        elif self.dist_impl == "gather":
            for owner, block in enumerate(all_gather_with_grad(text_features).chunk(world, dim=0)):
                if owner != rank:
                    yield block

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Scalar,
                logit_bias: Optional[Scalar], output_dict: bool = False):
        if self.world_size == 1:
            loss = self._block(image_features, text_features, logit_scale, logit_bias, positives=True)
        elif self.dist_impl == "reduce":
            _check_process_group("SigLipLoss", self.rank, self.world_size)
            loss = 0
            for owner in range(self.world_size):
                # Every rank keeps its (zeroed) share in the graph, so every rank joins the backward
                # all-reduce of every block; our own block comes back unchanged and holds the positives.
                block = all_reduce_with_grad(text_features * float(owner == self.rank))
                loss = loss + self._block(image_features, block, logit_scale, logit_bias,
                                          positives=owner == self.rank)
        else:
            _check_process_group("SigLipLoss", self.rank, self.world_size)
            loss = self._block(image_features, text_features, logit_scale, logit_bias, positives=True)
            for block in self._texts_of_other_ranks(text_features):
                loss = loss + self._block(image_features, block, logit_scale, logit_bias, positives=False)
        return {"contrastive_loss": loss} if output_dict else loss
