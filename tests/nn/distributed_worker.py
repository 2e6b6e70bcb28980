"""One rank of the distributed contrastive-loss test: every mode, vlfast's module and open_clip's.

Runs in a spawned process (so it imports no pytest fixtures) and writes its results to a file.
"""
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from vlfast.nn import ClipLoss, SigLipLoss
from vlfast.nn.contrastive import DIST_IMPLS

from .common import init_gloo, load_open_clip_loss, loss_and_grads

N_LOCAL, D = 5, 16  # odd per-rank batch
CLIP_MODES = {
    "gather": {},
    "gather_with_grad": {"gather_with_grad": True},
    "local_loss": {"local_loss": True},
    "local_loss_with_grad": {"local_loss": True, "gather_with_grad": True},
}


def global_batch(world_size: int) -> dict:
    """The seeded float64 batch of world_size * N_LOCAL unit-norm pairs that all ranks share out."""
    gen = torch.Generator().manual_seed(1234 + world_size)
    n = world_size * N_LOCAL
    image, text = (torch.nn.functional.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=1)
                   for _ in range(2))
    return {"image": image, "text": text, "clip_scale": torch.tensor(1 / 0.07, dtype=torch.float64),
            "siglip_scale": torch.tensor(10.0, dtype=torch.float64),
            "siglip_bias": torch.tensor(-10.0, dtype=torch.float64)}


def run_rank(rank: int, world_size: int, store: str, out_dir: str) -> None:
    """Save {(loss, mode, "vlfast" | "open_clip"): (loss, grads), "wrong rank": error} for this rank."""
    # open_clip calls torch.distributed.nn, deprecated as of torch 2.13: noise, not a finding here.
    warnings.filterwarnings("ignore", message="torch.distributed.nn.functional", category=FutureWarning)
    init_gloo(rank, world_size, store)
    oc = load_open_clip_loss()
    batch = global_batch(world_size)
    mine = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    image, text = batch["image"][mine], batch["text"][mine]
    common = {"rank": rank, "world_size": world_size}
    results = {}
    for mode, kwargs in CLIP_MODES.items():
        for name, module in (("vlfast", ClipLoss(**kwargs, **common, impl="reference")),
                             ("open_clip", oc.ClipLoss(**kwargs, **common))):
            results["clip", mode, name] = loss_and_grads(module, image, text, batch["clip_scale"], None)
    for mode in DIST_IMPLS:
        for name, module in (("vlfast", SigLipLoss(**common, dist_impl=mode, impl="reference")),
                             ("open_clip", oc.SigLipLoss(**common, dist_impl=mode))):
            results["siglip", mode, name] = loss_and_grads(module, image, text, batch["siglip_scale"],
                                                           batch["siglip_bias"])
    try:  # a rank that disagrees with the process group must fail before any collective
        ClipLoss(rank=(rank + 1) % world_size, world_size=world_size)(image, text, batch["clip_scale"])
        results["wrong rank"] = None
    except ValueError as e:
        results["wrong rank"] = str(e)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
