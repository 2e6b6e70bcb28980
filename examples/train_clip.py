"""Train a small CLIP on synthetic shapes, then classify held-out images zero-shot.

    python examples/train_clip.py                          # one process: minutes on a CPU
    torchrun --nproc_per_node 2 examples/train_clip.py     # data-parallel (gloo on CPUs, nccl on GPUs)

vlfast.models.CLIP trained with vlfast.nn.ClipLoss: under torchrun each rank takes its share of every
global batch, the loss gathers every rank's features (local_loss, gather_with_grad, as open_clip
trains) and DistributedDataParallel averages the gradients, so N ranks follow the same trajectory as
one process with the whole batch. The captions (shapes_data.py) go through a word-level tokenizer into
token ids and an attention mask; afterwards class names x prompt templates make a zero-shot
classifier for held-out images (24 colour-shape classes). Writes a loss-curve plot (--plot).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from shapes_data import TEMPLATES, WordTokenizer, class_names, make_shapes
from vlfast.models import CLIP, CLIPConfig, TextConfig, VisionConfig, ZeroShotClassifier
from vlfast.nn import ClipLoss

# Model sizes: the example's own, and a tiny one for tests.
MODELS = {"example": {"width": 64, "layers": 3, "heads": 4, "patch_size": 8, "embed_dim": 64},
          "tiny": {"width": 32, "layers": 2, "heads": 2, "patch_size": 8, "embed_dim": 32}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=MODELS, default="example")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128, help="global batch, split evenly over the ranks")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50, help="steps of linear warm-up before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--eval-size", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="train under torch.autocast(bfloat16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--plot", default="train_clip_loss.png", help="loss-curve PNG ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "train_size", "eval_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def model_config(name: str, image_size: int, tokenizer: WordTokenizer) -> CLIPConfig:
    m = MODELS[name]
    tower = {"width": m["width"], "layers": m["layers"], "heads": m["heads"], "mlp_dim": 4 * m["width"]}
    return CLIPConfig(embed_dim=m["embed_dim"],
                      vision=VisionConfig(image_size=image_size, patch_size=m["patch_size"], **tower),
                      text=TextConfig(vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length,
                                      **tower))


def setup_distributed(device: str) -> tuple:
    """(rank, world_size, whether this call created the process group).

    Uses a process group that already exists (tests), else torchrun's environment, else one process.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return 0, 1, False


def start(batch_size: int, device_name: str) -> tuple:
    """(rank, world, owns_group, device): the process group under torchrun (see setup_distributed), this
    rank's device, and a check that the global batch splits evenly over the ranks."""
    rank, world, owns_group = setup_distributed(device_name)
    if batch_size % world:
        raise SystemExit(f"--batch-size {batch_size} must be a multiple of the {world} ranks")
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, owns_group, torch.device(f"cuda:{local}" if device_name == "cuda" else device_name)


def optimizer(model: CLIP, lr: float, weight_decay: float, warmup: int, steps: int):
    # As open_clip: no weight decay on gains, biases and the temperature (the 0-d and 1-d tensors).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)

    def schedule(step: int) -> float:  # linear warm-up, then cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def global_mean(loss: torch.Tensor, world: int) -> float:
    """The mean of the ranks' local losses: the loss of the global batch (all ranks call it)."""
    logged = loss.detach().float()
    if world > 1:
        dist.all_reduce(logged)
        logged /= world
    return logged.item()


def optimise(loss_of, batches, opt, schedule, world: int, bar) -> list:
    """Per batch: loss_of(batch) -> backward, an optimiser and a schedule step; returns the ranks' mean
    losses (the progress bar shows the last, and is closed at the end)."""
    losses = []
    for batch in batches:
        loss = loss_of(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(global_mean(loss, world))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.update()
    bar.close()
    return losses


def batches(n: int, batch_size: int, steps: int, seed: int):
    """Global batches of indices: epochs of seeded permutations, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * batch_size / n))])
    return order[: steps * batch_size].view(steps, batch_size)


@torch.no_grad()
def zero_shot_accuracy(model: CLIP, tokenizer: WordTokenizer, images: torch.Tensor, labels: torch.Tensor,
                       device: torch.device, bf16: bool) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        classifier = ZeroShotClassifier.from_prompts(model, class_names(), TEMPLATES, tokenizer)
        predicted = torch.cat([classifier.predict(chunk.to(device)) for chunk in images.split(500)])
    return (predicted.cpu() == labels).float().mean().item()


def plot_losses(losses: list, path: str, what: str = "CLIP", marks: tuple = ()) -> str:
    """Writes the loss curve (raw and a moving average) of `what`, with a dashed line at each step in
    marks (e.g. where a training stage starts); returns a line saying what happened."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: matplotlib does not import ({e})"
    window = max(1, len(losses) // 20)
    smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist() if len(losses) >= window else losses
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, alpha=0.35, label="loss")
    ax.plot(range(window - 1, window - 1 + len(smooth)), smooth, label=f"mean of {window} steps")
    for step in marks:
        ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{what} loss")
    ax.set_title(f"vlfast {what} on synthetic shapes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"loss curve written to {path}"


def main(argv=None) -> dict:
    """Trains and evaluates; returns {"losses", "accuracy", "chance", "seconds", "model"}."""
    args = parse_args(argv)
    rank, world, owns_group, device = start(args.batch_size, args.device)
    local = args.batch_size // world
    log = rank == 0
    t0 = time.perf_counter()

    tokenizer = WordTokenizer()
    train = make_shapes(args.train_size, args.image_size, seed=args.seed)
    held_out = make_shapes(args.eval_size, args.image_size, seed=args.seed + 1)
    tokens = tokenizer(train.captions)
    torch.manual_seed(args.seed)  # every rank starts from the same weights
    model = CLIP(model_config(args.model, args.image_size, tokenizer)).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    opt, schedule = optimizer(model, args.lr, args.weight_decay, args.warmup, args.steps)
    if log:
        params = sum(p.numel() for p in model.parameters())
        print(f"training a {params / 1e6:.2f}M-parameter CLIP on {args.train_size} synthetic pairs: {args.steps} "
              f"steps of {args.batch_size} over {world} rank(s) on {device}", file=sys.stderr)

    bar = tqdm(total=args.steps, desc="training", unit="step", file=sys.stderr, disable=not log or args.quiet,
               mininterval=0.5, dynamic_ncols=True)
    losses = []
    for step, batch in enumerate(batches(args.train_size, args.batch_size, args.steps, args.seed), start=1):
        mine = batch[rank * local:(rank + 1) * local]
        images = train.images[mine].to(device)
        ids, mask = tokens["input_ids"][mine].to(device), tokens["attention_mask"][mine].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            image_features, text_features, scale = ddp(images, ids, mask)
        loss = loss_fn(image_features, text_features, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # as CLIP: the temperature stays >= 0.01
        losses.append(global_mean(loss, world))
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
        bar.update()
    bar.close()

    model.eval()
    accuracy = zero_shot_accuracy(model, tokenizer, held_out.images, held_out.labels, device, args.bf16)
    chance = 1 / len(class_names())
    seconds = time.perf_counter() - t0
    if log:
        marks = sorted({0, *(len(losses) * k // 10 for k in range(1, 10)), len(losses) - 1})
        print("loss by step: " + ", ".join(f"{i + 1}: {losses[i]:.3f}" for i in marks))
        print(f"zero-shot accuracy on {args.eval_size} held-out images: {accuracy:.1%} "
              f"(chance {chance:.1%}, {len(class_names())} classes); {seconds:.0f} s in all")
        if args.plot:
            print(plot_losses(losses, args.plot))
    if owns_group:
        dist.destroy_process_group()
    return {"losses": losses, "accuracy": accuracy, "chance": chance, "seconds": seconds, "model": model}


if __name__ == "__main__":
    main()
