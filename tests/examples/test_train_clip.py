"""examples/train_clip.py: a short seeded run learns (its loss falls, zero-shot accuracy far above chance)."""
import math

from .common import import_train_clip, tiny_args


def test_short_run_learns_and_classifies_zero_shot(tmp_path, capsys):
    train_clip = import_train_clip()
    plot = tmp_path / "loss.png"
    result = train_clip.main(tiny_args(steps=120, batch_size=64, train_size=2000, eval_size=480)
                             + ["--plot", str(plot)])
    losses = result["losses"]
    assert len(losses) == 120 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > math.log(64) - 0.3  # starts near chance: log(batch)
    assert last < 0.6 * first, (first, last)
    assert result["chance"] == 1 / 24
    assert result["accuracy"] > 6 * result["chance"], result["accuracy"]  # seen: 0.54 with seed 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "zero-shot accuracy on 480 held-out images" in out and "loss curve written to" in out


def test_bad_arguments_are_refused(capsys):
    train_clip = import_train_clip()
    for argv, message in ((["--steps", "0"], "--steps must be >= 1"), (["--model", "huge"], "invalid choice")):
        try:
            train_clip.parse_args(argv)
        except SystemExit:
            assert message in capsys.readouterr().err
        else:
            raise AssertionError(f"{argv} was accepted")
