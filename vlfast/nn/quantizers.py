"""Vector quantizers for image tokenizers: VectorQuantizer (VQ-VAE / VQGAN) and GumbelQuantizer
(DALL-E's discrete VAE), over vlfast.codebook_lookup.

Layout: inputs with 4 or more dimensions are channels-first images (B, C, H, W) (or (B, C, T, H, W));
inputs with 2 or 3 are channels-last, (N, C) or (B, N, C). Outputs keep the input's layout; indices
drop the channel axis: (B, H, W) or (B, N). channels_first=True / False overrides the rule.
"""
from __future__ import annotations

import math
import operator
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._dispatch import IMPLS
from ..ops.codebook_lookup import METRICS, codebook_lookup
from . import codebook_updates as updates


class QuantizerOutput(NamedTuple):
    quantized: Tensor   # the input's shape with C = dim; straight-through (VQ) or relaxed (Gumbel) gradient
    indices: Tensor     # int64, the input's shape without the channel axis
    loss: Tensor        # () float32 (float64 for float64 inputs)
    perplexity: Tensor  # () exp(entropy) of the codes picked in this process's batch
    usage: Tensor       # () fraction of the codebook picked in this process's batch


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__") or operator.index(value) < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return operator.index(value)


class _Codebook(nn.Module):
    """A (num_codes, dim) codebook, the layout rule, and embed / decode for the generation path."""

    def __init__(self, num_codes: int, dim: int, channels_first: Optional[bool], requires_grad: bool):
        super().__init__()
        self.num_codes = _positive_int("num_codes", num_codes)
        self.dim = _positive_int("dim", dim)
        if channels_first not in (None, True, False):
            raise ValueError(f"channels_first must be None, True or False, got {channels_first!r}")
        self.channels_first = channels_first
        self.codebook = nn.Parameter(torch.randn(self.num_codes, self.dim), requires_grad=requires_grad)

    def _is_channels_first(self, ndim: int) -> bool:
        return self.channels_first if self.channels_first is not None else ndim >= 4

    def _flatten(self, x: Tensor, channels: int, name: str) -> tuple[Tensor, bool]:
        """x -> (M, channels) rows, and whether x was channels-first."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: {name} must be a floating-point tensor")
        first = self._is_channels_first(x.dim())
        if x.dim() < 2 or (first and x.dim() < 3):
            raise ValueError(f"{type(self).__name__}: {name} must be (N, C), (B, N, C) or channels-first "
                             f"(B, C, H, W), got shape {tuple(x.shape)}")
        axis = 1 if first else -1
        if x.shape[axis] != channels:
            layout = "channels-first (B, C, ...)" if first else "channels-last (..., C)"
            raise ValueError(f"{type(self).__name__}: {name} has {x.shape[axis]} channels on its {layout} "
                             f"axis, expected {channels}; shape {tuple(x.shape)}")
        rows = x.movedim(1, -1) if first else x
        return rows.reshape(-1, channels), first

    @staticmethod
    def _index_shape(x: Tensor, first: bool) -> tuple:
        return (x.shape[0],) + tuple(x.shape[2:]) if first else tuple(x.shape[:-1])

    def _unflatten(self, rows: Tensor, index_shape: tuple, first: bool) -> Tensor:
        out = rows.reshape(*index_shape, rows.shape[-1])
        return out.movedim(-1, 1) if first else out

    def codes(self) -> Tensor:
        """The codebook as the quantizer uses it (K, dim)."""
        return self.codebook

    def embed(self, indices: Tensor) -> Tensor:
        """Code vectors for indices (...) -> (..., dim); differentiable in the codebook.

        indices must be integers in [0, num_codes) (checked: one host sync; on a GPU an index out of
        range would otherwise end in a device-side assert)."""
        name = f"{type(self).__name__}: indices"
        if not isinstance(indices, Tensor) or indices.is_floating_point() or indices.is_complex() \
                or indices.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {getattr(indices, 'dtype', type(indices).__name__)}")
        if indices.numel():
            low, high = (int(x) for x in torch.stack([indices.min(), indices.max()]).tolist())
            if low < 0 or high >= self.num_codes:
                raise ValueError(f"{name} must be in [0, {self.num_codes}), got values from {low} to {high}")
        return F.embedding(indices, self.codes())

    def decode(self, indices: Tensor) -> Tensor:
        """Indices from forward -> the quantized tensor in forward's layout (no straight-through):
        (B, H, W) -> (B, dim, H, W) for channels-first images, (B, N) -> (B, N, dim) otherwise."""
        vectors = self.embed(indices)
        return vectors.movedim(-1, 1) if self._is_channels_first(indices.dim() + 1) else vectors


class VectorQuantizer(_Codebook):
    """VQ-VAE / VQGAN quantizer: each vector becomes its exact nearest code (vlfast.codebook_lookup).

    forward(z) -> QuantizerOutput(quantized, indices, loss, perplexity, usage): quantized equals the
    chosen codes with a straight-through gradient to z (z + (q - z).detach()). The codebook starts
    from a standard normal (rows normalised for cosine), or from k-means with kmeans_init.
    loss = ||sg(z) - q||^2 (codebook) + commitment_weight * ||z - sg(q)||^2 (commitment), means over
    elements in float32 (float64 for float64); with ema_decay the codebook follows EMAs instead and
    loss is the commitment term alone.
    ema_decay: codebook <- EMA of the sum of its vectors / Laplace-smoothed EMA of their count
      (eps), updated in training; sizes start at 1 and sums at the codes (as if each code had absorbed
      itself). Without it the codebook is a Parameter trained by the codebook loss. On CUDA the sums
      are atomic adds, bit-reproducible only under torch.use_deterministic_algorithms(True).
    metric="cosine": vectors and codes are l2-normalised; quantized is the normalised code.
    dead_code_threshold > 0: in training, codes whose EMA count (decay ema_decay, or 0.99) falls below
      it restart at random vectors of the batch.
    kmeans_init: the first training batch sets the codebook by kmeans_iters Lloyd iterations.
    Under torch.distributed (sync_distributed=True, process_group with more than one process; None is
    the default group) counts and sums are all-reduced and random choices come from the group's first
    rank: every rank keeps the same codebook. Every rank of the group must then call forward in
    training together, with at least one vector each. Pass the data-parallel group when the model
    is also split across ranks.
    The lookup runs in the wider of z's and the codebook's dtypes (exact for both); impl picks its
    implementation.
    """

    def __init__(self, num_codes: int, dim: int, *, commitment_weight: float = 0.25,
                 ema_decay: Optional[float] = None, metric: str = "l2", dead_code_threshold: float = 0.0,
                 kmeans_init: bool = False, kmeans_iters: int = 10, eps: float = 1e-5,
                 sync_distributed: bool = True, process_group=None, channels_first: Optional[bool] = None,
                 impl: str = "auto"):
        super().__init__(num_codes, dim, channels_first, requires_grad=ema_decay is None)
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must be None or in (0, 1), got {ema_decay!r}")
        for name, value in (("commitment_weight", commitment_weight), ("dead_code_threshold", dead_code_threshold),
                            ("eps", eps)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if impl not in ("auto",) + IMPLS:
            raise ValueError(f"impl must be one of {('auto',) + IMPLS}, got {impl!r}")
        self.commitment_weight = float(commitment_weight)
        self.ema_decay = ema_decay
        self.metric = metric
        self.dead_code_threshold = float(dead_code_threshold)
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = _positive_int("kmeans_iters", kmeans_iters)
        self.eps = float(eps)
        self.sync_distributed = sync_distributed
        self.process_group = process_group
        self.impl = impl
        with torch.no_grad():
            if metric == "cosine":
                self.codebook.copy_(F.normalize(self.codebook, dim=-1))
        self.register_buffer("cluster_size", torch.ones(self.num_codes))
        if ema_decay is not None:
            self.register_buffer("embed_avg", self.codebook.detach().clone())
        self.register_buffer("initted", torch.tensor(not kmeans_init))

    def codes(self) -> Tensor:
        return F.normalize(self.codebook, dim=-1) if self.metric == "cosine" else self.codebook

    def forward(self, z: Tensor) -> QuantizerOutput:
        rows, first = self._flatten(z, self.dim, "z")
        if self.training and self.kmeans_init and not bool(self.initted):  # the check syncs: only when asked
            self._kmeans_init(rows.detach())
        x = F.normalize(rows, dim=-1) if self.metric == "cosine" else rows
        codes = self.codes()
        wide = torch.promote_types(x.dtype, codes.dtype)  # exact for both: no rounding before the lookup
        index, _ = codebook_lookup(rows.detach().to(wide), self.codebook.detach().to(wide), metric=self.metric,
                                   impl=self.impl)
        q = F.embedding(index, codes)
        loss_dtype = torch.float64 if wide == torch.float64 else torch.float32
        loss = self.commitment_weight * F.mse_loss(x.to(loss_dtype), q.detach().to(loss_dtype))
        if self.ema_decay is None:
            loss = loss + F.mse_loss(q.to(loss_dtype), x.detach().to(loss_dtype))
        quantized = x + (q.to(x.dtype) - x).detach()
        counts = updates.code_counts(index, self.num_codes, loss_dtype)
        perplexity, usage = updates.usage_statistics(counts)
        if self.training:
            self._update(x.detach(), index, counts)
        index_shape = self._index_shape(z, first)
        return QuantizerOutput(self._unflatten(quantized, index_shape, first), index.reshape(index_shape), loss,
                               perplexity, usage)

    @property
    def _group(self):
        return self.process_group if self.sync_distributed else updates.LOCAL

    @torch.no_grad()
    def _update(self, x: Tensor, index: Tensor, counts: Tensor) -> None:
        counts = counts.clone()  # the returned statistics stay this process's own
        normalize = self.metric == "cosine"
        if self.ema_decay is not None:
            sums = updates.code_sums(x, index, self.num_codes)
            updates.all_reduce_(counts, sums, group=self._group)
            updates.ema_update_(self.codebook, self.cluster_size, self.embed_avg, counts, sums, self.ema_decay,
                                self.eps, normalize)
        else:
            updates.all_reduce_(counts, group=self._group)
            self.cluster_size.mul_(0.99).add_(counts.to(self.cluster_size.dtype), alpha=0.01)
        if self.dead_code_threshold > 0:
            updates.restart_dead_codes_(self.codebook, self.cluster_size, getattr(self, "embed_avg", None), x,
                                        self.dead_code_threshold, normalize, self._group)

    @torch.no_grad()
    def _kmeans_init(self, rows: Tensor) -> None:
        x = rows.to(self.codebook.dtype)
        centroids = updates.kmeans(x, self.num_codes, self.kmeans_iters, self.metric, self.impl, self._group)
        self.codebook.copy_(centroids)
        self.cluster_size.fill_(1.0)
        if self.ema_decay is not None:
            self.embed_avg.copy_(centroids)
        self.initted.fill_(True)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, metric={self.metric!r}, "
                f"commitment_weight={self.commitment_weight}, ema_decay={self.ema_decay}, "
                f"dead_code_threshold={self.dead_code_threshold}")


class GumbelQuantizer(_Codebook):
    """DALL-E's discrete-VAE bottleneck: logits over num_codes codes -> a relaxed one-hot -> code vectors.

    forward(logits) -> QuantizerOutput(quantized, indices, loss, perplexity, usage), logits with the
    codes on the channel axis: (B, K, H, W) or (..., K). In training, y = softmax((logits + g) /
    temperature) with Gumbel noise g, quantized = y @ codebook; hard=True uses the one-hot of argmax y
    forward and y's gradient backward (straight-through). In eval, the argmax code, no noise.
    loss = kl_weight * KL(softmax(logits) || uniform), mean over positions, float32.
    temperature is an attribute: anneal it during training (DALL-E goes from 1 to 1/16).
    """

    def __init__(self, num_codes: int, dim: int, *, temperature: float = 1.0, hard: bool = False,
                 kl_weight: float = 1.0, channels_first: Optional[bool] = None):
        super().__init__(num_codes, dim, channels_first, requires_grad=True)
        self.temperature = temperature  # checked by the setter below
        self.hard = hard
        if not math.isfinite(kl_weight) or kl_weight < 0:
            raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight!r}")
        self.kl_weight = float(kl_weight)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        # checked on every assignment, so an annealing schedule that reaches 0 fails where it does
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"GumbelQuantizer: temperature must be a finite number > 0, got {value!r}")
        self._temperature = float(value)

    def forward(self, logits: Tensor) -> QuantizerOutput:
        rows, first = self._flatten(logits, self.num_codes, "logits")
        compute = torch.float64 if rows.dtype == torch.float64 else torch.float32
        rows = rows.to(compute)
        log_q = F.log_softmax(rows, dim=-1)
        kl = (log_q.exp() * (log_q + math.log(self.num_codes))).sum(dim=-1).mean()
        codes = self.codebook.to(compute)
        if self.training:
            gumbel = -torch.empty_like(rows).exponential_().log()
            y = F.softmax((rows + gumbel) / self.temperature, dim=-1)
            index = y.argmax(dim=-1)
            if self.hard:
                y = F.one_hot(index, self.num_codes).to(compute) - y.detach() + y
            q = y @ codes
        else:
            index = rows.argmax(dim=-1)
            q = F.embedding(index, codes)
        perplexity, usage = updates.usage_statistics(updates.code_counts(index, self.num_codes, compute))
        index_shape = self._index_shape(logits, first)
        return QuantizerOutput(self._unflatten(q.to(logits.dtype), index_shape, first), index.reshape(index_shape),
                               self.kl_weight * kl, perplexity, usage)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, dim={self.dim}, temperature={self.temperature}, hard={self.hard}, "
                f"kl_weight={self.kl_weight}")
