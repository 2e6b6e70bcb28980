"""examples/train_llava.py runs both stages end to end at tiny sizes (the real run is in the README)."""
import importlib
import sys

import pytest

from .common import EXAMPLES

pytest.importorskip("safetensors")


def _module():
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("train_llava")


TINY = ["--model", "tiny", "--clip-steps", "5", "--clip-train-size", "256", "--stage1-steps", "6",
        "--stage2-steps", "12", "--batch-size", "8", "--train-scenes", "40", "--eval-scenes", "4", "--quiet"]


def test_two_stages_then_evaluation(tmp_path):
    m = _module()
    clip = tmp_path / "clip.safetensors"
    out = m.main(TINY + ["--save-clip", str(clip), "--plot", str(tmp_path / "loss.png")])
    assert set(out["accuracy"]) <= {"conversation", "description", "reasoning", "conclusion"}
    assert {"conversation", "description"} <= set(out["accuracy"])
    assert len(out["losses"][1]) == 6 and len(out["losses"][2]) == 12
    assert all(loss == loss for loss in out["losses"][1] + out["losses"][2])  # no NaN
    assert (tmp_path / "loss.png").is_file() and clip.is_file()
    model = out["model"]
    assert not any(p.requires_grad for p in model.vision_tower.parameters())  # stage 2 leaves the tower frozen
    # the saved CLIP loads back as the vision tower of a second run, which then trains no CLIP
    again = m.main(TINY + ["--clip", str(clip), "--stage2-steps", "2", "--plot", ""])
    for (name, a), b in zip(model.vision_tower.state_dict().items(), again["model"].vision_tower.state_dict().values()):
        assert (a == b).all(), name
