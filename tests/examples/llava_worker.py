"""The ranks of tests/examples/test_train_llava_distributed.py, and the single-process references they
are compared with.

run_example_rank: examples/train_llava.py's main() (DistributedDataParallel) inside a gloo group, with
the vision tower read from out_dir/clip.safetensors. HalvesLoss: one process doing what DDP does with
2 ranks, for the reference run.
run_fsdp_rank: a tiny LLaVA under FSDP2 (fully_shard per decoder layer, per vision block, and at the
root); each SCENARIOS entry takes optimizer steps on this rank's half of BATCH and saves the loss, the
gathered gradients and the gathered parameters after each step. fsdp_reference does the same in one
process on the whole batch.
"""
import importlib
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vlfast.models import LLaVA, LlamaConfig, LlavaConfig
from vlfast.models.clip import VisionConfig

from ..nn.common import init_gloo
from .common import EXAMPLES

# --- examples/train_llava.py under DDP ----------------------------------------------------------------
# A larger --lr than the example's so that the few warm-up steps move the weights far past the tolerance.
EXAMPLE_ARGS = ["--model", "tiny", "--stage1-steps", "3", "--stage2-steps", "4", "--batch-size", "8",
                "--train-scenes", "40", "--eval-scenes", "2", "--lr", "0.05", "--quiet", "--plot", ""]


def import_train_llava():
    if str(EXAMPLES) not in sys.path:  # as when it runs as a script: its folder holds train_clip.py
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("train_llava")


def example_args(out_dir) -> list:
    return EXAMPLE_ARGS + ["--clip", str(Path(out_dir) / "clip.safetensors")]


def write_clip(out_dir) -> None:
    """A (seeded, untrained) tiny CLIP for --clip: no CLIP training in the runs compared."""
    from safetensors.torch import save_file
    m = import_train_llava()
    config = m.train_clip.model_config("tiny", 32, m.train_clip.WordTokenizer())
    torch.manual_seed(1)
    clip = m.train_clip.CLIP(config)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(Path(out_dir) / "clip.safetensors"))


def run_example_rank(rank: int, world_size: int, store: str, out_dir: str) -> None:
    init_gloo(rank, world_size, store)
    result = import_train_llava().main(example_args(out_dir))
    torch.save({"losses": result["losses"], "state": result["model"].state_dict(), "accuracy": result["accuracy"]},
               Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


class HalvesLoss(torch.nn.Module):
    """What the example's LossModule under DDP on 2 ranks optimises, in one process: the mean of the
    two halves' losses, each half (a rank's share) cut to its own padded length as its rank pads it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels, pixels, mask):
        half = ids.shape[0] // 2
        losses = []
        for rows in (slice(0, half), slice(half, None)):
            length = int(mask[rows].sum(1).max())
            losses.append(self.model.loss(ids[rows, :length], labels[rows, :length], pixels[rows],
                                          attention_mask=mask[rows, :length]))
        return (losses[0] + losses[1]) / 2


# --- FSDP2 ---------------------------------------------------------------------------------------------
IMAGE, BOS, EOS = 3, 1, 2
# (name, dtype, the training stage of each step: None trains every parameter)
SCENARIOS = [("all trainable", torch.float64, [None]),
             ("stage 2 (vision tower frozen)", torch.float64, [2]),
             ("stage 1 then stage 2", torch.float64, [1, 2]),
             ("stage 2, float32", torch.float32, [2])]


def fsdp_config() -> LlavaConfig:
    vision = VisionConfig(image_size=16, patch_size=8, width=16, layers=2, heads=2, mlp_dim=32)
    text = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=40, num_layers=2, num_heads=2,
                       num_kv_heads=1, max_position_embeddings=64)
    return LlavaConfig(vision=vision, text=text, image_token_index=IMAGE, vision_feature_layer=-2)


def fsdp_batch(world_size: int) -> list:
    """Per rank: (input_ids, labels, attention_mask, pixels), right-padded to the rank's longest row.

    Rows differ in length (padding differs between a rank's batch and the whole batch) but every row
    has 5 labelled tokens, so the mean of the ranks' mean losses is the whole batch's mean loss."""
    g = torch.Generator().manual_seed(5)
    tokens = 4  # fsdp_config's tokens_per_image
    rows = []
    for i in range(2 * world_size):
        before, after = torch.randint(4, 48, (1 + i % 3,), generator=g), torch.randint(4, 48, (2 + i,), generator=g)
        answer = torch.randint(4, 48, (4,), generator=g)
        ids = torch.cat([torch.tensor([BOS]), before, torch.full((tokens,), IMAGE), after, answer, torch.tensor([EOS])])
        labels = torch.full_like(ids, -100)
        labels[-5:] = ids[-5:]
        rows.append((ids, labels))
    pixels = torch.randn(2 * world_size, 3, 16, 16, generator=g)
    return [_pad(rows[2 * r:2 * r + 2], pixels[2 * r:2 * r + 2]) for r in range(world_size)]


def _pad(rows, pixels) -> tuple:
    longest = max(len(ids) for ids, _ in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), -100)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, :len(a)], labels[i, :len(b)], mask[i, :len(a)] = a, b, 1
    return ids, labels, mask, pixels


def whole_batch(world_size: int) -> tuple:
    """The ranks' batches concatenated, padded to the longest row of all."""
    parts = fsdp_batch(world_size)
    rows = [(ids[i, :int(mask[i].sum())], labels[i, :int(mask[i].sum())]) for ids, labels, mask, _ in parts
            for i in range(ids.shape[0])]
    return _pad(rows, torch.cat([p for *_, p in parts]))


def new_model(dtype) -> LLaVA:
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return LLaVA(fsdp_config()).to(dtype)


def _full(t):
    return None if t is None else (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train_steps(model, batch, stages, dtype) -> list:
    """Per step: {"loss", "grads": {name: tensor or None}, "params": {name: tensor after the step}}, with
    DTensors gathered (full_tensor(), on every rank alike)."""
    ids, labels, mask, pixels = batch
    out = []
    for stage in stages:
        if stage is not None:
            model.set_training_stage(stage)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loss = model.loss(ids, labels, pixels.to(dtype), attention_mask=mask)
        loss.backward()
        grads = {name: _full(p.grad) for name, p in model.named_parameters()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append({"loss": loss.detach().clone(), "grads": grads,
                    "params": {name: _full(p) for name, p in model.named_parameters()}})
    return out


def fsdp_reference(world_size: int) -> dict:
    """{scenario name: train_steps of one process on the whole batch}."""
    return {name: train_steps(new_model(dtype), whole_batch(world_size), stages, dtype)
            for name, dtype, stages in SCENARIOS}


def run_fsdp_rank(rank: int, world_size: int, store: str, out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    init_gloo(rank, world_size, store)
    mesh = init_device_mesh("cpu", (world_size,))
    results, placements = {}, {}
    for name, dtype, stages in SCENARIOS:
        model = new_model(dtype)
        for block in model.vision_tower.blocks:
            fully_shard(block, mesh=mesh)
        for layer in model.language_model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        register_fsdp_forward_method(model, "loss")  # loss() runs the root's unshard / reshard as forward() does
        placements[name] = {n: (type(p).__name__, str(getattr(p, "placements", None)), tuple(p.to_local().shape))
                            for n, p in model.named_parameters()}
        results[name] = train_steps(model, fsdp_batch(world_size)[rank], stages, dtype)
    torch.save({"results": results, "placements": placements}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
