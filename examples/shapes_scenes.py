"""Scenes of several shapes, and visual instruction data made from their ground truth (LLaVA's recipe).

Each image holds 1 to 3 shapes (shapes_data.py's shapes, colours and sizes) at different places. From a
scene's ground truth come
  - the context LLaVA's recipe gives a text-only model: captions and boxes, "red circle: [x0, y0, x1, y1]"
    (normalised to the image side);
  - three kinds of instructions, with answers checkable against the truth:
      conversation   short questions about colour, shape, place and count ("what colour is the circle ?")
      description    a detailed description listing every shape with its size, colour and place
      reasoning      relations between two shapes ("is the red circle left of the blue square ?" -> "the red
                     circle is in the top left and the blue square is in the middle , so yes")
Every question has exactly one right answer, so held-out accuracy per kind can be measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shapes_data import COLOURS, PLACES, SHAPES, SIZES, shape_masks

NUMBERS = ("zero", "one", "two", "three")
KINDS = ("conversation", "description", "reasoning")


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    place: str
    box: tuple  # (x0, y0, x1, y1), fractions of the image side

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


@dataclass
class Scenes:
    images: Tensor  # (N, 3, S, S) float32, about zero-mean unit-variance
    objects: list   # per image, a list of Shape


def make_scenes(n: int, image_size: int = 32, *, seed: int, max_shapes: int = 3) -> Scenes:
    """n images of 1..max_shapes shapes with distinct colour-shape names at distinct places."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.arange(image_size, dtype=torch.float32) + 0.5
    places = list(PLACES)
    images, objects = [], []
    for _ in range(n):
        count = int(torch.randint(1, max_shapes + 1, (1,), generator=g))
        where = torch.randperm(len(places), generator=g)[:count].tolist()
        names = set()
        image = 0.1 + 0.05 * torch.randn(3, image_size, image_size, generator=g)
        scene = []
        for p in where:
            while True:  # distinct names, so "the red circle" is one shape
                shape = SHAPES[int(torch.randint(len(SHAPES), (1,), generator=g))]
                colour = list(COLOURS)[int(torch.randint(len(COLOURS), (1,), generator=g))]
                if (colour, shape) not in names:
                    names.add((colour, shape))
                    break
            size = list(SIZES)[int(torch.randint(len(SIZES), (1,), generator=g))]
            cx, cy = PLACES[places[p]]
            r = SIZES[size] * 0.8  # a little smaller than shapes_data's: several must fit
            covered = shape_masks(torch.tensor([SHAPES.index(shape)]), grid[None, None, :] - cx * image_size,
                             grid[None, :, None] - cy * image_size, torch.tensor([[[r * image_size]]]))[0]
            rgb = torch.tensor(COLOURS[colour])
            image = torch.where(covered[None], rgb[:, None, None], image)
            box = tuple(round(min(max(v, 0.0), 1.0), 2) for v in (cx - r, cy - r, cx + r, cy + r))
            scene.append(Shape(shape, colour, size, places[p], box))
        images.append((image - 0.14) / 0.17)
        objects.append(scene)
    return Scenes(torch.stack(images).float(), objects)


def context(scene: list) -> str:
    """The text-only description the recipe's instruction writer reads: captions and normalised boxes."""
    caption = "a picture of " + " and ".join(f"a {s.size} {s.name}" for s in scene)
    boxes = "; ".join(f"{s.name}: [{', '.join(f'{v:.2f}' for v in s.box)}]" for s in scene)
    return f"{caption}. {boxes}"


def _relation(a: Shape, b: Shape, g: torch.Generator) -> tuple:
    """A yes / no question about where a is relative to b, decided by their centres. The answer reasons
    step by step, as the recipe's complex-reasoning answers do: where each shape is, then the conclusion
    ("the red circle is in the top left and the blue square is in the middle , so yes")."""
    (ax, ay), (bx, by) = a.centre, b.centre
    options = []
    if abs(ax - bx) > 0.1:
        options.append(("left of", ax < bx))
    if abs(ay - by) > 0.1:
        options.append(("above", ay < by))
    if not options:
        return None
    words, truth = options[int(torch.randint(len(options), (1,), generator=g))]
    steps = f"the {a.name} is in the {a.place} and the {b.name} is in the {b.place}"
    return f"is the {a.name} {words} the {b.name} ?", f"{steps} , so {'yes' if truth else 'no'}"


def instructions(scene: list, g: torch.Generator) -> list:
    """[(kind, question, answer)] for one scene: conversation and description always, reasoning when it
    holds two shapes at different places."""
    out = []
    s = scene[int(torch.randint(len(scene), (1,), generator=g))]
    shapes = [x.shape for x in scene]
    questions = [(f"where is the {s.name} ?", f"in the {s.place}"),
                 ("how many shapes are there ?", NUMBERS[len(scene)])]
    if shapes.count(s.shape) == 1:
        questions.append((f"what colour is the {s.shape} ?", s.colour))
    if [x.colour for x in scene].count(s.colour) == 1:
        questions.append((f"what shape is the {s.colour} one ?", s.shape))
    q, a = questions[int(torch.randint(len(questions), (1,), generator=g))]
    out.append(("conversation", q, a))
    described = " and ".join(f"a {x.size} {x.name} in the {x.place}" for x in scene)
    out.append(("description", "describe the picture in detail .", f"there is {described} ."))
    if len(scene) > 1:
        i, j = torch.randperm(len(scene), generator=g)[:2].tolist()
        relation = _relation(scene[i], scene[j], g)
        if relation is not None:
            out.append(("reasoning",) + relation)
    return out


def vocabulary() -> list:
    """Every word the questions, answers and captions use (for a word tokenizer)."""
    words = {"where", "is", "the", "in", "how", "many", "shapes", "are", "there", "?", "what", "colour", "shape",
             "one", "describe", "picture", "detail", ".", "a", "and", "left", "of", "above", "yes", "no", "so", ","}
    words |= set(NUMBERS) | set(SHAPES) | set(SIZES) | {w for name in (*COLOURS, *PLACES) for w in name.split()}
    return sorted(words)
