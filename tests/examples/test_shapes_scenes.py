"""examples/shapes_scenes.py: the instruction data's answers agree with what the images show."""
import importlib
import sys

import torch

from .common import EXAMPLES


def _module():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("shapes_scenes")


def _pixel_colour(image, x, y):
    """The colour name nearest to the pixel at fractions (x, y) of the side (undoing the normalisation)."""
    m = _module()
    size = image.shape[-1]
    rgb = image[:, int(y * size), int(x * size)] * 0.17 + 0.14
    names = list(m.COLOURS)
    dist = [float(((rgb - torch.tensor(m.COLOURS[n])) ** 2).sum()) for n in names]
    return names[min(range(len(names)), key=dist.__getitem__)]


def test_scenes_render_what_their_objects_say():
    m = _module()
    scenes = m.make_scenes(40, 32, seed=3)
    assert scenes.images.shape == (40, 3, 32, 32)
    for image, scene in zip(scenes.images, scenes.objects):
        assert 1 <= len(scene) <= 3
        assert len({s.place for s in scene}) == len(scene) and len({s.name for s in scene}) == len(scene)
        for s in scene:
            assert 0 <= s.box[0] < s.box[2] <= 1 and 0 <= s.box[1] < s.box[3] <= 1
            cx, cy = m.PLACES[s.place]
            assert abs(s.centre[0] - cx) < 0.02 and abs(s.centre[1] - cy) < 0.02
            # every shape covers its centre (the triangle too: apex up, centre inside)
            assert _pixel_colour(image, cx, cy) == s.colour, (s, scene)


def test_answers_follow_from_the_ground_truth():
    m = _module()
    scenes = m.make_scenes(60, 32, seed=4)
    g = torch.Generator().manual_seed(0)
    kinds = set()
    vocab = set(m.vocabulary())
    for scene in scenes.objects:
        for kind, question, answer in m.instructions(scene, g):
            kinds.add(kind)
            assert set(question.split()) <= vocab and set(answer.split()) <= vocab, (question, answer)
            if question.startswith("how many"):
                assert answer == m.NUMBERS[len(scene)]
            elif question.startswith("where is the"):
                name = question[len("where is the "):-2]
                assert answer == f"in the {next(s.place for s in scene if s.name == name)}"
            elif question.startswith("what colour is the"):
                shape = question.split()[-2]
                assert [s.colour for s in scene if s.shape == shape] == [answer]
            elif question.startswith("what shape is the"):
                colour = question.split()[-3]
                assert [s.shape for s in scene if s.colour == colour] == [answer]
            elif kind == "description":
                assert all(f"{s.size} {s.name} in the {s.place}" in answer for s in scene)
            else:  # "is the A left of / above the B ?"
                words = question[len("is the "):-2]
                rel = "left of" if " left of " in words else "above"
                a_name, b_name = words.split(f" {rel} the ")
                a = next(s for s in scene if s.name == a_name)
                b = next(s for s in scene if s.name == b_name)
                axis = 0 if rel == "left of" else 1
                conclusion = "yes" if a.centre[axis] < b.centre[axis] else "no"
                assert answer == f"the {a.name} is in the {a.place} and the {b.name} is in the {b.place} , so {conclusion}"
    assert kinds == set(m.KINDS)


def test_context_lists_captions_and_boxes():
    m = _module()
    scene = m.make_scenes(1, 32, seed=5).objects[0]
    text = m.context(scene)
    for s in scene:
        assert f"{s.name}: [{s.box[0]:.2f}" in text and f"a {s.size} {s.name}" in text
