"""ClipLoss / SigLipLoss over torch.distributed (gloo, 2-4 spawned ranks) against open_clip, and
against the single-process loss of the concatenated batch.

Each world size is spawned once; every mode runs inside the workers (distributed_worker.py), which
save their losses and gradients to tmp_path. Relations to the full-batch loss L (float64), verified
on open_clip's results as well as ours:
  ClipLoss, gather without grad: every rank's loss is L and its features' gradient is dL/d(its
    slice): only the local slice of the gathered batch is differentiable, so no factor world_size.
  ClipLoss gather_with_grad, local_loss with grad, SigLipLoss (all dist_impl): the mean over ranks
    of the loss is L (gather_with_grad: every rank's loss is L), and the features' gradient is
    world_size * dL/d(slice): each rank's loss reaches every rank's features and backward sums them.
  ClipLoss local_loss without grad: the mean loss is L, but each rank's gradient keeps only its own
    rows' terms (the gathered copies are constants), which is no multiple of dL/d(slice); only the
    parity with open_clip is checked there.
  logit_scale / logit_bias (a copy per rank): the mean over ranks of their gradients is dL/d(scale)
    and dL/d(bias), in every mode.
"""
import pytest
import torch

from vlfast.nn.contrastive import DIST_IMPLS

from .common import loss_and_grads, open_clip_loss_or_skip, spawn_world
from .distributed_worker import CLIP_MODES, N_LOCAL, global_batch, run_rank

oc = open_clip_loss_or_skip()

pytestmark = pytest.mark.distributed

TIGHT = {"rtol": 1e-10, "atol": 1e-12}
# mode -> factor between a rank's feature gradient and the full-batch gradient of its slice (None: no
# such relation), and whether every rank's loss (not only their mean) equals the full-batch loss.
RELATIONS = {
    ("clip", "gather"): (1, True),
    ("clip", "gather_with_grad"): ("world_size", True),
    ("clip", "local_loss"): (None, False),
    ("clip", "local_loss_with_grad"): ("world_size", False),
    **{("siglip", mode): ("world_size", False) for mode in DIST_IMPLS},
}


@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    """(world_size, [per-rank results]) from one spawn of world_size gloo ranks."""
    world_size = request.param
    return world_size, spawn_world(run_rank, world_size, tmp_path_factory.mktemp(f"world{world_size}"))


def full_batch(world_size):
    """open_clip's single-process (loss, grads) on the concatenated batch, per loss kind."""
    b = global_batch(world_size)
    return {"clip": loss_and_grads(oc.ClipLoss(), b["image"], b["text"], b["clip_scale"], None),
            "siglip": loss_and_grads(oc.SigLipLoss(), b["image"], b["text"], b["siglip_scale"],
                                     b["siglip_bias"])}


@pytest.mark.parametrize("kind, mode", list(RELATIONS), ids=lambda x: x)
def test_matches_open_clip(world, kind, mode):
    world_size, ranks = world
    for rank, results in enumerate(ranks):
        (loss, grads), (want_loss, want_grads) = results[kind, mode, "vlfast"], results[kind, mode, "open_clip"]
        torch.testing.assert_close(loss, want_loss, **TIGHT, msg=lambda m: f"rank {rank} loss: {m}")
        assert len(grads) == len(want_grads)
        for i, (g, w) in enumerate(zip(grads, want_grads)):
            torch.testing.assert_close(g, w, **TIGHT, msg=lambda m: f"rank {rank} gradient {i}: {m}")


@pytest.mark.parametrize("impl", ["vlfast", "open_clip"])
@pytest.mark.parametrize("kind, mode", list(RELATIONS), ids=lambda x: x)
def test_relation_to_full_batch(world, kind, mode, impl):
    world_size, ranks = world
    full_loss, full_grads = full_batch(world_size)[kind]
    factor, every_rank = RELATIONS[kind, mode]
    losses = torch.stack([r[kind, mode, impl][0] for r in ranks])
    torch.testing.assert_close(losses.mean(), full_loss, **TIGHT)
    if every_rank:
        torch.testing.assert_close(losses, full_loss.expand(world_size), **TIGHT)
    for i in range(2, len(full_grads)):  # logit_scale, logit_bias
        mean_grad = torch.stack([r[kind, mode, impl][1][i] for r in ranks]).mean()
        torch.testing.assert_close(mean_grad, full_grads[i], **TIGHT)
    if factor is None:
        return
    factor = world_size if factor == "world_size" else factor
    for rank, results in enumerate(ranks):
        mine = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for g, full in zip(results[kind, mode, impl][1][:2], full_grads[:2]):
            torch.testing.assert_close(g, factor * full[mine], **TIGHT)


def test_rank_that_disagrees_with_process_group(world):
    for rank, results in enumerate(world[1]):
        assert results["wrong rank"] is not None, f"rank {rank}: no error"
        assert f"process group has rank {rank}" in results["wrong rank"]


def test_every_mode_ran(world):
    _, ranks = world
    modes = {key[:2] for key in ranks[0] if key != "wrong rank"}
    assert modes == set(RELATIONS) == {("clip", m) for m in CLIP_MODES} | {("siglip", m) for m in DIST_IMPLS}
