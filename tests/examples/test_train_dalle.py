"""examples/train_dalle.py end to end at tiny sizes (the real run is in the README), and its attribute checker."""
import importlib
import sys

import torch

from .common import EXAMPLES


def _import(name: str):
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


TINY = ["--clip-steps", "5", "--dvae-steps", "6", "--steps", "6", "--batch-size", "16", "--train-size", "300",
        "--k", "2", "--vocab", "32", "--n-hid", "8", "--dim", "32", "--layers", "2", "--heads", "2", "--quiet"]


def test_three_stages_then_the_report(tmp_path, capsys):
    m = _import("train_dalle")
    picture = tmp_path / "samples.png"
    report = m.main(TINY + ["--picture", str(picture)])
    assert set(report["random sample"]) == set(report["CLIP's pick"]) == {"colour", "shape", "place", "all"}
    assert report["chance"] == {"colour": 1 / 6, "shape": 1 / 4, "place": 1 / 5, "all": 1 / 120}
    assert 0 <= report["reconstruction_mse"] < 1
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "24 captions x 2 samples" in out and "CLIP's pick" in out


def test_the_gumbel_dvae_runs_too(tmp_path):
    m = _import("train_dalle")
    report = m.main(TINY + ["--quantizer", "gumbel", "--picture", ""])
    assert "reconstruction_mse" in report


def test_the_checker_reads_the_rendered_attributes():
    data_module, checker = _import("shapes_data"), _import("shapes_checker")
    data = data_module.make_shapes(400, 32, seed=3)
    found = checker.judge(data.images * data_module.STD + data_module.MEAN)
    assert torch.equal(found["colour"], data.labels // 4)
    assert torch.equal(found["shape"], data.labels % 4)
    assert torch.equal(found["place"], data.places)
    blank = checker.judge(torch.full((2, 3, 32, 32), 0.1))
    assert all((v == checker.NOTHING).all() for v in blank.values())
