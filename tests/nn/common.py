"""Shared test helpers: open_clip's loss module, a loss-plus-gradients runner, and spawning gloo ranks."""
import importlib.util
from datetime import timedelta
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@lru_cache(maxsize=None)
def load_open_clip_loss() -> Optional[ModuleType]:
    """open_clip/loss.py as a module, or None when open_clip is not installed.

    Loaded from its file so that open_clip/__init__.py (which imports torchvision, broken beside
    this torch) never runs. CI installs it with pip install --no-deps open-clip-torch==3.3.0.
    """
    spec = importlib.util.find_spec("open_clip")  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    loss_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(module)
    return module


def open_clip_loss_or_skip() -> ModuleType:
    import pytest
    module = load_open_clip_loss()
    if module is None:
        pytest.skip("open_clip is not installed (pip install --no-deps open-clip-torch==3.3.0)",
                    allow_module_level=True)
    return module


def loss_and_grads(module, image, text, scale, bias, **kwargs):
    """(loss, [d image, d text, d scale, d bias (when bias is given)]) on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    bias_leaf = None if bias is None else bias.detach().clone().requires_grad_()
    out = module(*leaves, bias_leaf, **kwargs)
    loss = out["contrastive_loss"] if isinstance(out, dict) else out
    loss.backward()
    grads = [t.grad for t in leaves] + ([] if bias_leaf is None else [bias_leaf.grad])
    return loss.detach(), grads


def init_gloo(rank: int, world_size: int, store: str) -> None:
    """Join a gloo group of world_size local ranks through the file `store`; one thread per rank."""
    torch.set_num_threads(1)  # CI has 2 cores for up to 4 ranks
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))


def spawn_world(run_rank: Callable, world_size: int, out_dir: Path) -> list:
    """Run run_rank(rank, world_size, store, out_dir) in world_size spawned processes, each of which saves
    out_dir/rank{r}.pt; returns what they saved, in rank order."""
    mp.start_processes(run_rank, args=(world_size, str(out_dir / "store"), str(out_dir)), nprocs=world_size,
                       join=True, start_method="spawn")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world_size)]
