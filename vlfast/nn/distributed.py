"""Moving features between ranks for the contrastive losses, with gradients that find their way back.

gather_features collects every rank's batch (ClipLoss); exchange / exchange_bidir pass one block to
a neighbour at a time (SigLipLoss), so that no rank holds more than a few blocks at once;
all_gather_with_grad / all_reduce_with_grad serve SigLipLoss's "gather" and "reduce" modes. Ranks are
ranks of the default process group (or horovod's, for gather_features with use_horovod=True).
The autograd Functions are our own: torch.distributed.nn's are deprecated as of torch 2.13.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def import_horovod():
    """horovod.torch, or an ImportError that says how to get it (checked when a loss is built)."""
    try:
        import horovod.torch as hvd
    except ImportError as e:
        raise ImportError("use_horovod=True needs horovod: pip install horovod (built with PyTorch support), "
                          f"or use torch.distributed (use_horovod=False); import failed with: {e}") from e
    return hvd


def gather_features(image_features: Tensor, text_features: Tensor, *, local_loss: bool = False,
                    gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                    use_horovod: bool = False) -> tuple[Tensor, Tensor]:
    """Every rank's features, concatenated in rank order: (N, D), (N, D) -> (world_size * N, D) each.

    gather_with_grad=True: gradients reach every rank's features (each rank's loss is then
    differentiated on all ranks, so a rank's gradient is the sum over ranks).
    gather_with_grad=False: the gathered copies are constants, except that, unless local_loss, this
    rank's own slice is the input itself, so the local features still get their gradient.
    """
    if use_horovod:
        hvd = import_horovod()
        if gather_with_grad:
            return hvd.allgather(image_features), hvd.allgather(text_features)
        with torch.no_grad():
            all_image, all_text = hvd.allgather(image_features), hvd.allgather(text_features)
        if local_loss:
            return all_image, all_text
        image_parts = list(all_image.chunk(world_size, dim=0))
        text_parts = list(all_text.chunk(world_size, dim=0))
    elif gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    else:
        image_parts = [torch.empty_like(image_features) for _ in range(world_size)]
        text_parts = [torch.empty_like(text_features) for _ in range(world_size)]
        dist.all_gather(image_parts, image_features.contiguous())
        dist.all_gather(text_parts, text_features.contiguous())
    if not local_loss:
        # local_loss differentiates only through its own rows, which it takes from the inputs directly.
        image_parts[rank] = image_features
        text_parts[rank] = text_features
    return torch.cat(image_parts, dim=0), torch.cat(text_parts, dim=0)


class AllGather(torch.autograd.Function):
    """(N, D) on each rank -> (world_size * N, D), every rank's tensor in rank order.

    Backward: each rank's slice gets the sum over ranks of the gradients of that slice. An all-reduce
    and a slice do it on every backend and torch version (gloo's reduce-scatter is recent).
    """

    @staticmethod
    def forward(ctx, group, tensor: Tensor) -> Tensor:
        ctx.group = group
        parts = [torch.empty_like(tensor, memory_format=torch.contiguous_format)
                 for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = AllReduce.apply(ctx.group, grad)
        return None, total.chunk(dist.get_world_size(ctx.group), dim=0)[dist.get_rank(ctx.group)]


class AllReduce(torch.autograd.Function):
    """Sum of the tensor over ranks, on every rank; the gradient is summed over ranks the same way."""

    @staticmethod
    def forward(ctx, group, tensor: Tensor) -> Tensor:
        ctx.group = group
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, AllReduce.apply(ctx.group, grad)


def all_gather_with_grad(tensor: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """(N, D) -> (world_size * N, D); gradients reach every rank's tensor."""
    return AllGather.apply(group, tensor)


def all_reduce_with_grad(tensor: Tensor, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Sum over ranks, same shape; differentiable (every rank must take part in the backward too)."""
    return AllReduce.apply(group, tensor)


def _send_and_receive(sends: list[tuple[int, Tensor]], receives: list[tuple[int, Tensor]],
                      group) -> list[Tensor]:
    """Post all sends (peer, tensor) and receives (peer, like) at once; the received tensors, in order.

    Batching them lets every rank send before it receives, so a ring of exchanges cannot deadlock.
    """
    buffers = [torch.empty_like(like, memory_format=torch.contiguous_format) for _, like in receives]
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group=group) for peer, t in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer, group=group) for (peer, _), buf in zip(receives, buffers)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return buffers


class NeighbourExchange(torch.autograd.Function):
    """Send a tensor to to_rank and receive one of the same shape from from_rank.

    The gradient of what was received travels back the other way, to the rank that sent it.
    """

    @staticmethod
    def forward(ctx, from_rank: int, to_rank: int, group, tensor: Tensor) -> Tensor:
        ctx.from_rank, ctx.to_rank, ctx.group = from_rank, to_rank, group
        (received,) = _send_and_receive([(to_rank, tensor)], [(from_rank, tensor)], group)
        return received

    @staticmethod
    def backward(ctx, grad_received: Tensor):
        return None, None, None, NeighbourExchange.apply(ctx.to_rank, ctx.from_rank, ctx.group, grad_received)


class NeighbourExchangeBidir(torch.autograd.Function):
    """Send one tensor to each neighbour and receive one from each: returns (from_right, from_left).

    Backward runs the same exchange mirrored: the gradient of what came from the right goes back right.
    """

    @staticmethod
    def forward(ctx, left_rank: int, right_rank: int, group, to_left: Tensor, to_right: Tensor):
        ctx.left_rank, ctx.right_rank, ctx.group = left_rank, right_rank, group
        from_right, from_left = _send_and_receive(
            [(right_rank, to_right), (left_rank, to_left)],
            [(right_rank, to_left), (left_rank, to_right)], group)
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right: Tensor, grad_from_left: Tensor):
        # Mirrored: what we send "left" goes to right_rank, so it carries grad_from_right home.
        grad_to_left, grad_to_right = NeighbourExchangeBidir.apply(
            ctx.right_rank, ctx.left_rank, ctx.group, grad_from_right, grad_from_left)
        return None, None, None, grad_to_left, grad_to_right


def exchange(tensor: Tensor, from_rank: int, to_rank: int, group: Optional[dist.ProcessGroup] = None) -> Tensor:
    """Send `tensor` (N, D) to to_rank, return the (N, D) tensor from from_rank; differentiable."""
    return NeighbourExchange.apply(from_rank, to_rank, group, tensor)


def exchange_bidir(to_left: Tensor, to_right: Tensor, left_rank: int, right_rank: int,
                   group: Optional[dist.ProcessGroup] = None) -> tuple[Tensor, Tensor]:
    """Send to_left to left_rank and to_right to right_rank; return (from_right, from_left); differentiable.

    Each received tensor has the shape of the one sent the same way (from_right ~ to_left).
    """
    return NeighbourExchangeBidir.apply(left_rank, right_rank, group, to_left, to_right)
