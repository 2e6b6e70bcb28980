"""CLIP's embedding arithmetic on the synthetic shapes: a red circle's image - "red" + "blue" -> blue circles.

    python examples/embedding_arithmetic.py          # trains train_clip.py's CLIP (minutes on a CPU), then searches

The seed's "multimodal vector space arithmetic" (a blue car's image - "blue" + "red" -> red cars) as an exact
search: the shapes CLIP of examples/train_clip.py embeds a gallery of held-out images, and for query images of
every colour and shape, vlfast.retrieval.embedding_arithmetic finds the gallery images nearest to
image - text(source colour) + text(target colour) (vlfast.similarity_topk, exact top k). It reports how many of
the top k have the target colour and the query's shape, against chance and against the two halves alone (the
image alone keeps the shape, the target colour's text alone finds the colour), and draws a few queries with
their nearest images (--picture).
"""
from __future__ import annotations

import argparse
import time

import torch

import train_clip
from image_grid import save_image_grid
from shapes_data import COLOURS, SHAPES, WordTokenizer, make_shapes
from vlfast.retrieval import arithmetic_query, embedding_arithmetic
from vlfast import similarity_topk


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="CLIP training steps (train_clip.py)")
    p.add_argument("--model", choices=list(train_clip.MODELS), default="example")
    p.add_argument("--batch-size", type=int, default=128, help="CLIP training batch (train_clip.py)")
    p.add_argument("--train-size", type=int, default=20000, help="CLIP training pairs (train_clip.py)")
    p.add_argument("--gallery", type=int, default=3000, help="held-out images searched")
    p.add_argument("--queries", type=int, default=4, help="query images per colour and shape")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--text", default="a {}", help="template of the colour texts (e.g. '{}' or 'a {}')")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--picture", default="embedding_arithmetic.png", help="PNG of a few searches ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no training progress bar")
    return p.parse_args(argv)


def attributes(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(colour, shape) indices of class labels (class_names() is colour-major)."""
    return labels // len(SHAPES), labels % len(SHAPES)


def query_set(n_per_class: int, image_size: int, seed: int):
    """n_per_class images of every colour-shape class, from a fresh draw: (images, colours, shapes)."""
    pool = make_shapes(40 * n_per_class * len(COLOURS) * len(SHAPES), image_size, seed=seed)
    keep = torch.cat([torch.nonzero(pool.labels == c).flatten()[:n_per_class]
                      for c in range(len(COLOURS) * len(SHAPES))])
    colour, shape = attributes(pool.labels[keep])
    return pool.images[keep], colour, shape


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.perf_counter()
    trained = train_clip.main(["--steps", str(args.steps), "--model", args.model, "--batch-size", str(args.batch_size),
                               "--train-size", str(args.train_size), "--plot", "", "--seed", str(args.seed),
                               "--device", "cpu"] + (["--quiet"] if args.quiet else []))
    model = trained["model"].eval()
    image_size = model.config.vision.image_size
    tokenizer = WordTokenizer()
    gallery_set = make_shapes(args.gallery, image_size, seed=args.seed + 2)
    gallery_colour, gallery_shape = attributes(gallery_set.labels)
    images, colour, shape = query_set(args.queries, image_size, seed=args.seed + 3)
    names = list(COLOURS)
    with torch.no_grad():
        gallery = model.encode_image(gallery_set.images)
        image_embeds = model.encode_image(images)
        texts = tokenizer([args.text.format(c) for c in names])
        colour_embeds = model.encode_text(texts["input_ids"], attention_mask=texts["attention_mask"])

    # Every query image goes to every other colour: image - text(its colour) + text(target).
    rows = [(i, t) for i in range(len(images)) for t in range(len(names)) if t != int(colour[i])]
    src, target = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    searches = {
        "image - text(colour) + text(target)": arithmetic_query(image_embeds[src], colour_embeds[colour[src]],
                                                                colour_embeds[target]),
        "image alone": image_embeds[src],
        "text(target) alone": colour_embeds[target],
    }
    report = {}
    for name, query in searches.items():
        hits, _ = similarity_topk(query, gallery, args.k, metric="cosine")
        got_colour = gallery_colour[hits] == target[:, None]
        got_shape = gallery_shape[hits] == shape[src][:, None]
        report[name] = {"colour+shape": (got_colour & got_shape).double().mean().item(),
                        "colour": got_colour.double().mean().item(), "shape": got_shape.double().mean().item()}
    both = (gallery_colour[None, :] == target[:, None]) & (gallery_shape[None, :] == shape[src][:, None])
    report["chance (gallery fractions)"] = {"colour+shape": both.double().mean().item(),
                                            "colour": 1 / len(names), "shape": 1 / len(SHAPES)}
    seconds = time.perf_counter() - t0

    print(f"top-{args.k} of {args.gallery} held-out images for {len(rows)} searches "
          f"({args.queries} images per colour-shape class x {len(names) - 1} target colours; texts '{args.text}'):")
    print(f"  {'search':40s} {'colour+shape':>13s} {'colour':>8s} {'shape':>8s}   (target colour, query's shape)")
    for name, r in report.items():
        print(f"  {name:40s} {r['colour+shape']:13.1%} {r['colour']:8.1%} {r['shape']:8.1%}")
    print(f"({seconds:.0f} s in all, training included)")
    if args.picture:
        print(draw(model, images, colour, shape, names, gallery_set.images, tokenizer, args))
    return {"report": report, "seconds": seconds, "zero_shot_accuracy": trained["accuracy"]}


def draw(model, images, colour, shape, names, gallery_images, tokenizer, args) -> str:
    """One row per example: the query image, then its k nearest gallery images."""
    examples = [(0, 2), (1, 0), (2, 3), (3, 1)]  # (shape, target colour) for a query of the next colour
    rows, titles = [], []
    with torch.no_grad():
        gallery = model.encode_image(gallery_images)
        for s, t in examples:
            i = int(torch.nonzero((shape == s) & (colour != t)).flatten()[0])
            minus, plus = (tokenizer([args.text.format(names[c])]) for c in (int(colour[i]), t))
            hits, _ = embedding_arithmetic(model, images[i:i + 1], minus["input_ids"], plus["input_ids"], gallery,
                                           args.k, minus_mask=minus["attention_mask"],
                                           plus_mask=plus["attention_mask"])
            rows.append([images[i]] + [gallery_images[j] for j in hits[0].tolist()])
            titles.append(f"- {names[int(colour[i])]} + {names[t]}")
    return save_image_grid(rows, args.picture, titles, cell=(1.3, 1.5),
                           title="query image - text(its colour) + text(target): the nearest held-out images")


if __name__ == "__main__":
    main()
