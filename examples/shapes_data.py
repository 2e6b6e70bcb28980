"""A synthetic image-caption set made in code, and the word-level tokenizer for its captions.

Each image shows one shape (circle, square, triangle, cross) of one colour, at one of five places,
small or large, on a noisy dark background. Its caption names what is there over a closed
vocabulary, e.g. "a picture of a large red circle in the top left"; the size and the place are
each left out half the time, so short prompts such as "a red circle" are captions too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.3, 1.0),
           "yellow": (1.0, 0.95, 0.1), "purple": (0.7, 0.1, 0.9), "white": (1.0, 1.0, 1.0)}
PLACES = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
          "bottom right": (0.73, 0.73), "middle": (0.5, 0.5)}  # (x, y) as fractions of the side
SIZES = {"small": 0.12, "large": 0.22}  # radius as a fraction of the side
TEMPLATES = ("a {}", "a picture of a {}", "there is a {}")  # captions, and the zero-shot prompts
MEAN, STD = 0.14, 0.17  # Shapes.images = (pixels in [0, 1] - MEAN) / STD


def class_names() -> list:
    """The zero-shot classes: every colour-shape pair ("red circle", ...)."""
    return [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]


class WordTokenizer:
    """Closed-vocabulary word tokenizer: <pad> = 0, <sot> = 1, the words, <eot> = the largest id.

    <eot> is the largest id, so the text tower pools there by argmax (OpenAI's convention).
    __call__(texts) -> {"input_ids": (N, context_length), "attention_mask": (N, context_length)}.
    """

    def __init__(self, context_length: int = 16):
        words = {"a", "picture", "of", "there", "is", "in", "the"}
        words |= set(SHAPES) | set(SIZES) | {w for name in (*COLOURS, *PLACES) for w in name.split()}
        self.vocab = ["<pad>", "<sot>", *sorted(words), "<eot>"]
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts) -> dict:
        ids = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            unknown = [w for w in text.split() if w not in self.ids]
            if unknown:
                raise ValueError(f"words {unknown} are not in the vocabulary")
            tokens = [self.ids["<sot>"], *(self.ids[w] for w in text.split()), self.ids["<eot>"]]
            if len(tokens) > self.context_length:
                raise ValueError(f"{text!r} is {len(tokens)} tokens; context_length is {self.context_length}")
            ids[row, :len(tokens)] = torch.tensor(tokens)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


@dataclass
class Shapes:
    images: Tensor  # (N, 3, S, S) float32, about zero-mean unit-variance
    captions: list  # N strings
    labels: Tensor  # (N,) index into class_names()
    places: Tensor  # (N,) index into PLACES (whether or not the caption names it)


def shape_masks(shape: Tensor, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """(N, S, S) bool: which pixels the shape covers, for offsets dx, dy (N, S, S) from its centre."""
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r
    triangle = (dy.abs() <= r) & (dx.abs() <= (dy + r) / 2)  # apex up
    cross = ((dx.abs() <= r / 3) & (dy.abs() <= r)) | ((dy.abs() <= r / 3) & (dx.abs() <= r))
    return torch.stack([circle, square, triangle, cross])[shape, torch.arange(len(shape))]


def make_shapes(n: int, image_size: int = 32, *, seed: int) -> Shapes:
    """n random images and captions; the same seed gives the same set."""
    g = torch.Generator().manual_seed(seed)

    def pick(options) -> Tensor:
        return torch.randint(len(options), (n,), generator=g)

    shape, colour, place, size = pick(SHAPES), pick(COLOURS), pick(PLACES), pick(SIZES)
    centres = torch.tensor(list(PLACES.values()))[place] * image_size
    centres += (torch.rand(n, 2, generator=g) - 0.5) * 0.08 * image_size  # jitter
    radius = torch.tensor(list(SIZES.values()))[size] * image_size * (0.9 + 0.2 * torch.rand(n, generator=g))
    grid = torch.arange(image_size, dtype=torch.float32) + 0.5
    dx = grid[None, None, :] - centres[:, 0, None, None]
    dy = grid[None, :, None] - centres[:, 1, None, None]
    covered = shape_masks(shape, dx, dy, radius[:, None, None])  # (N, S, S)
    rgb = torch.tensor(list(COLOURS.values()))[colour]
    rgb = (rgb * (0.85 + 0.15 * torch.rand(n, 1, generator=g))).clamp(0, 1)
    background = 0.1 + 0.05 * torch.randn(n, 3, image_size, image_size, generator=g)
    images = torch.where(covered[:, None], rgb[:, :, None, None], background)
    images = (images - MEAN) / STD  # roughly zero-mean, unit-variance pixels, as CLIP's preprocessing gives

    captions = []
    keep_size, keep_place = (torch.rand(n, generator=g) < 0.5).tolist(), (torch.rand(n, generator=g) < 0.5).tolist()
    template = pick(TEMPLATES).tolist()
    size_words, colour_words, place_words = list(SIZES), list(COLOURS), list(PLACES)
    for i in range(n):
        words = [size_words[size[i]]] * keep_size[i] + [colour_words[colour[i]], SHAPES[shape[i]]]
        words += ["in", "the", place_words[place[i]]] * keep_place[i]
        captions.append(TEMPLATES[template[i]].format(" ".join(words)))
    labels = colour * len(SHAPES) + shape
    return Shapes(images=images.float(), captions=captions, labels=labels, places=place)
