"""One rank of examples/train_dalle.py's data-parallel run: its main() inside a gloo process group."""
import importlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..nn.common import init_gloo
from .common import EXAMPLES

ARGS = ["--clip-steps", "3", "--dvae-steps", "3", "--steps", "3", "--batch-size", "16", "--train-size", "200",
        "--k", "2", "--vocab", "32", "--n-hid", "8", "--dim", "32", "--layers", "2", "--heads", "2", "--quiet",
        "--picture", ""]


def run_rank(rank: int, world_size: int, store: str, out_dir: str) -> None:
    init_gloo(rank, world_size, store)
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    report = importlib.import_module("train_dalle").main(ARGS)
    torch.save({"report": report}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
