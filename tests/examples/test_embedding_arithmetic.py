"""examples/embedding_arithmetic.py: image - text(colour) + text(target) finds the target colour and keeps the shape."""
from .common import import_train_clip


def test_short_run_moves_the_colour_and_keeps_the_shape(tmp_path, capsys):
    import_train_clip()  # puts examples/ on sys.path
    import embedding_arithmetic
    picture = tmp_path / "arithmetic.png"
    result = embedding_arithmetic.main(["--model", "tiny", "--steps", "150", "--batch-size", "64", "--train-size",
                                        "2000", "--gallery", "600", "--queries", "2", "--k", "5", "--quiet",
                                        "--picture", str(picture)])
    report = result["report"]
    arithmetic, image, text = (report[name] for name in ("image - text(colour) + text(target)", "image alone",
                                                          "text(target) alone"))
    chance = report["chance (gallery fractions)"]
    assert chance["colour"] == 1 / 6 and chance["shape"] == 1 / 4
    # the sum does what neither half does: the image alone keeps its colour, the text alone ignores the shape
    assert arithmetic["colour+shape"] > 3 * chance["colour+shape"], report
    assert arithmetic["colour+shape"] > max(image["colour+shape"], text["colour+shape"]), report
    assert image["colour"] < chance["colour"], report
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "picture written to" in capsys.readouterr().out
