"""Train a small DALL-E on the synthetic shapes, sample K images per caption, re-rank them with CLIP.

    python examples/train_dalle.py                          # one process: minutes on a CPU
    torchrun --nproc_per_node 2 examples/train_dalle.py     # data-parallel training (gloo on CPUs, nccl on GPUs)

The seed's three stages on the shapes of shapes_data.py (32 x 32 images, captions over a closed vocabulary):
  1. a discrete VAE (vlfast.models.DiscreteVAE; VQ with dead-code restarts, or --quantizer gumbel with the
     temperature annealed) turns each image into a 4 x 4 grid of tokens; its reconstruction error is reported;
  2. a DALL-E transformer (vlfast.models.DALLE: text tokens then image tokens, row / column / convolutional
     sparse attention) learns the captions' tokens followed by the images' (the 1/8 + 7/8 loss);
  3. for captions naming a colour, a shape and a place, K images each are sampled with the KV cache and
     decoded, the CLIP of train_clip.py picks the best of each K, and every image is judged by
     shapes_checker.py (the rendered colour, shape and place). It reports the attributes' accuracy of a
     random sample (the mean over all K) and of CLIP's pick against chance, and draws a grid (--picture):
     per caption its K samples, then the pick.
Under torchrun every training stage is data-parallel (DistributedDataParallel); rank 0 samples and reports.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import train_clip
from image_grid import save_image_grid
from shapes_checker import NOTHING, judge
from shapes_data import COLOURS, MEAN, PLACES, SHAPES, STD, WordTokenizer, make_shapes
from vlfast.models import DALLE, DALLEConfig, DiscreteVAE, DiscreteVAEConfig
from vlfast.models.dalle import rerank

ATTRIBUTES = ("colour", "shape", "place")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dvae-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1500, help="transformer training steps")
    p.add_argument("--clip-steps", type=int, default=500, help="training steps of the re-ranking CLIP (train_clip.py)")
    p.add_argument("--batch-size", type=int, default=64, help="global batch, split evenly over the ranks")
    p.add_argument("--train-size", type=int, default=20000)
    p.add_argument("--vocab", type=int, default=128, help="the dVAE's codes")
    p.add_argument("--n-hid", type=int, default=32, help="the dVAE's width")
    p.add_argument("--quantizer", choices=("vq", "gumbel"), default="vq",
                   help="the dVAE's: VQ with dead-code restarts, or DALL-E's Gumbel softmax")
    p.add_argument("--kl-weight", type=float, default=1.0, help="the Gumbel dVAE's KL to the uniform prior")
    p.add_argument("--dvae-lr", type=float, default=3e-3)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--k", type=int, default=16, help="images sampled per caption")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None, help="sample among the top k image tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--picture", default="train_dalle.png", help="PNG of samples and picks ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    for name in ("dvae_steps", "steps", "clip_steps", "batch_size", "train_size", "k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def pixels(images: torch.Tensor) -> torch.Tensor:
    """shapes_data's normalised images -> pixels in [0, 1]."""
    return (images * STD + MEAN).clamp(0, 1)


def train(model, loss_of, steps: int, lr: float, data_size: int, args, rank: int, world: int, desc: str,
          on_step=None) -> list:
    """Adam with a cosine schedule over `steps` of the global batch; loss_of(rows) -> this rank's loss."""
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    local = args.batch_size // world
    bar = tqdm(total=steps, desc=desc, unit="step", file=sys.stderr, disable=rank != 0 or args.quiet,
               mininterval=0.5, dynamic_ncols=True)
    def step_loss(numbered):
        step, batch = numbered
        if on_step is not None:
            on_step(step)
        return loss_of(ddp, batch[rank * local:(rank + 1) * local])

    numbered = enumerate(train_clip.batches(data_size, args.batch_size, steps, args.seed), start=1)
    return train_clip.optimise(step_loss, numbered, opt, schedule, world, bar)


def train_dvae(images: torch.Tensor, args, device, rank: int, world: int) -> DiscreteVAE:
    torch.manual_seed(args.seed)
    # VQ by default: at this budget the Gumbel quantizer kept to a few codes and lost the colours (tried:
    # KL weights 0 to 1, 1000-1500 steps), while VQ with dead-code restarts had them after 700 steps
    dvae = DiscreteVAE(DiscreteVAEConfig(image_size=images.shape[-1], n_hid=args.n_hid, blocks_per_group=1,
                                         vocab_size=args.vocab, n_init=64, quantizer=args.quantizer,
                                         kl_weight=args.kl_weight,
                                         dead_code_threshold=1.0 if args.quantizer == "vq" else 0.0)).to(device)

    def anneal(step: int) -> None:  # DALL-E's Gumbel temperature: 1 -> 1/16, here over the first 80 % of steps
        if args.quantizer == "gumbel":
            dvae.quantizer.temperature = max(1 / 16, math.exp(math.log(1 / 16) * step / (0.8 * args.dvae_steps)))

    def loss_of(model, rows):
        return model(pixels(images[rows]).to(device)).loss

    train(dvae, loss_of, args.dvae_steps, args.dvae_lr, images.shape[0], args, rank, world, "dVAE", anneal)
    return dvae.eval()


def encode_all(dvae: DiscreteVAE, images: torch.Tensor, device, block: int = 1000) -> torch.Tensor:
    """(N, grid * grid) codes of every image."""
    return torch.cat([dvae.encode(pixels(images[i:i + block]).to(device)).flatten(1).cpu()
                      for i in range(0, images.shape[0], block)])


def train_dalle(codes: torch.Tensor, tokens: dict, args, device, rank: int, world: int, tokenizer,
                grid: int) -> DALLE:
    torch.manual_seed(args.seed)
    model = DALLE(DALLEConfig(text_vocab=tokenizer.vocab_size, text_len=tokenizer.context_length,
                              image_vocab=args.vocab, grid=grid, dim=args.dim, layers=args.layers, heads=args.heads,
                              conv_kernel=3)).to(device)
    text = padded_text(model, tokens)

    def loss_of(ddp, rows):
        return ddp(text[rows].to(device), codes[rows].to(device))  # DALLE.forward is its loss

    train(model, loss_of, args.steps, args.lr, codes.shape[0], args, rank, world, "DALL-E")
    return model.eval()


def prompts() -> tuple[list, torch.Tensor]:
    """A caption per colour-shape pair, each with a place (cycling through them): (captions, (P, 3) truth)."""
    captions, truth = [], []
    places = list(PLACES)
    for c, colour in enumerate(COLOURS):
        for s, shape in enumerate(SHAPES):
            p = (c * len(SHAPES) + s) % len(places)
            captions.append(f"a picture of a {colour} {shape} in the {places[p]}")
            truth.append((c, s, p))
    return captions, torch.tensor(truth)


def accuracy(found: dict, truth: torch.Tensor) -> dict:
    """{attribute: fraction right, "all": all three right}, found from judge(), truth (N, 3)."""
    right = torch.stack([found[a] == truth[:, i] for i, a in enumerate(ATTRIBUTES)], dim=1)
    out = {a: right[:, i].double().mean().item() for i, a in enumerate(ATTRIBUTES)}
    out["all"] = right.all(dim=1).double().mean().item()
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    rank, world, owns_group, device = train_clip.start(args.batch_size, args.device)
    log = rank == 0
    t0 = time.perf_counter()

    clip_run = train_clip.main(["--steps", str(args.clip_steps), "--plot", "", "--seed", str(args.seed), "--device",
                                args.device] + (["--quiet"] if args.quiet else []))
    clip = clip_run["model"].eval()
    data = make_shapes(args.train_size, 32, seed=args.seed + 10)
    held_out = make_shapes(500, 32, seed=args.seed + 11)
    tokenizer = WordTokenizer()

    dvae = train_dvae(data.images, args, device, rank, world)
    with torch.no_grad():
        target = pixels(held_out.images).to(device)
        rebuilt = dvae.decode(dvae.encode(target))
        recon_mse = (rebuilt - target).pow(2).mean().item()
        truth = torch.stack([held_out.labels // len(SHAPES), held_out.labels % len(SHAPES), held_out.places], dim=1)
        recon_accuracy = accuracy(judge(rebuilt.cpu()), truth)
    codes = encode_all(dvae, data.images, device)
    tokens = tokenizer(data.captions)
    grid = dvae.config.grid
    model = train_dalle(codes, tokens, args, device, rank, world, tokenizer, grid)

    report = {}
    if log:
        captions, truth = prompts()
        prompt_tokens = tokenizer(captions)
        prompt_text = padded_text(model, prompt_tokens).to(device)
        g = torch.Generator(device=device).manual_seed(args.seed)
        with torch.no_grad():
            sampled = model.generate(prompt_text, num_images=args.k, temperature=args.temperature, top_k=args.top_k,
                                     generator=g)
            images = dvae.decode(sampled.view(-1, grid, grid))  # (P * K, 3, 32, 32) in [0, 1]
            best, scores = rerank(((images - MEAN) / STD), prompt_tokens["input_ids"].to(device), clip, args.k,
                                  attention_mask=prompt_tokens["attention_mask"].to(device))
        found = judge(images.cpu())
        every = accuracy(found, truth.repeat_interleave(args.k, dim=0))
        picked = best.cpu() + torch.arange(len(captions)) * args.k
        top1 = accuracy({a: found[a][picked] for a in ATTRIBUTES}, truth)
        chance = {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "place": 1 / len(PLACES)}
        chance["all"] = chance["colour"] * chance["shape"] * chance["place"]
        empty = (found["colour"] == NOTHING).double().mean().item()
        report = {"random sample": every, "CLIP's pick": top1, "chance": chance}
        seconds = time.perf_counter() - t0
        print(f"dVAE: held-out reconstruction MSE {recon_mse:.4f} (pixels in [0, 1]); the checker on the "
              f"reconstructions: " + ", ".join(f"{a} {v:.1%}" for a, v in recon_accuracy.items()))
        print(f"{len(captions)} captions x {args.k} samples (temperature {args.temperature}, top-k {args.top_k}); "
              f"{empty:.1%} of the samples show no shape. Attribute accuracy:")
        print(f"  {'':16s}" + "".join(f"{a:>9s}" for a in (*ATTRIBUTES, "all")))
        for name, r in report.items():
            print(f"  {name:16s}" + "".join(f"{r[a]:9.1%}" for a in (*ATTRIBUTES, "all")))
        print(f"({seconds:.0f} s in all, CLIP, dVAE and DALL-E training included)")
        if args.picture:
            print(draw(images.cpu(), best.cpu(), captions, args))
        report.update(reconstruction_mse=recon_mse, reconstruction_accuracy=recon_accuracy, seconds=seconds)
    if owns_group:
        dist.destroy_process_group()
    return report


def padded_text(model: DALLE, tokens: dict) -> torch.Tensor:
    """The tokenizer's caption ids with DALL-E's per-position padding tokens past each caption."""
    return model.pad_text(tokens["input_ids"], tokens["attention_mask"].sum(dim=1))


def draw(images: torch.Tensor, best: torch.Tensor, captions: list, args) -> str:
    """Six captions of different colours, shapes and places: their K samples, then CLIP's pick."""
    chosen = [p for p in (0, 6, 9, 13, 19, 22) if p < len(captions)]
    rows = [[images[p * args.k + j] for j in range(args.k)] + [images[p * args.k + int(best[p])]] for p in chosen]
    titles = [captions[p].replace("a picture of a ", "") for p in chosen]
    return save_image_grid(rows, args.picture, titles, highlight_last="CLIP's pick", stretch=False, cell=(0.9, 1.1))


if __name__ == "__main__":
    main()
