"""One rank of the data-parallel training test: the example's main() inside a gloo process group."""
from pathlib import Path

import torch
import torch.distributed as dist

from ..nn.common import init_gloo
from .common import import_train_clip, tiny_args

ARGS = tiny_args(steps=4, batch_size=24, train_size=240, eval_size=48) + ["--plot", ""]


def run_rank(rank: int, world_size: int, store: str, out_dir: str) -> None:
    init_gloo(rank, world_size, store)
    result = import_train_clip().main(ARGS)
    torch.save({"losses": result["losses"], "state": result["model"].state_dict(), "accuracy": result["accuracy"]},
               Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
