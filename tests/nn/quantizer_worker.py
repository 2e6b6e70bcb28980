"""One rank of the distributed VectorQuantizer test: a few training steps per configuration, in process
groups of 2, 3 and 4 ranks carved out of one spawn of 4 (one spawn: each costs seconds on CI's cores).

Runs in a spawned process (so it imports no pytest fixtures) and writes its states to a file.
"""
from pathlib import Path

import torch
import torch.distributed as dist

from vlfast.nn import VectorQuantizer

from .common import init_gloo

WORLD, GROUP_SIZES = 4, (2, 3, 4)
N_LOCAL, K, D, STEPS = 6, 8, 5, 4
CONFIGS = {
    "ema": {"ema_decay": 0.8},
    "kmeans+restarts": {"ema_decay": 0.8, "kmeans_init": True, "kmeans_iters": 2, "dead_code_threshold": 0.7},
    "cosine+restarts": {"metric": "cosine", "dead_code_threshold": 0.995},
}


def global_batches(group_size: int) -> list:
    """STEPS float64 batches of group_size * N_LOCAL vectors in three clusters, shared out by rank."""
    gen = torch.Generator().manual_seed(99 + group_size)
    centres = 3 * torch.randn(3, D, generator=gen, dtype=torch.float64)
    n = group_size * N_LOCAL
    return [centres[torch.randint(0, 3, (n,), generator=gen)] + torch.randn(n, D, generator=gen, dtype=torch.float64)
            for _ in range(STEPS)]


def make_quantizer(config: str, group=None) -> VectorQuantizer:
    torch.manual_seed(0)  # the same initial codebook everywhere
    return VectorQuantizer(K, D, impl="reference", process_group=group, **CONFIGS[config]).double().train()


def run_rank(rank: int, world_size: int, store: str, out_dir: str) -> None:
    """Save {(group size, config): [state_dict after each step]} for the groups this rank is in."""
    init_gloo(rank, world_size, store)
    results = {}
    for size in GROUP_SIZES:
        group = dist.new_group(list(range(size)))  # every rank creates every group, in the same order
        if rank >= size:
            continue
        mine = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        for config in CONFIGS:
            vq = make_quantizer(config, group)
            torch.manual_seed(100 + rank)  # ranks draw different numbers: only the first rank's may be used
            states = []
            for batch in global_batches(size):
                vq(batch[mine])
                states.append({k: v.clone() for k, v in vq.state_dict().items()})
            results[size, config] = states
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
