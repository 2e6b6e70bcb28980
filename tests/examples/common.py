"""Importing examples/train_clip.py (a script, not a package module) and its tiny test settings."""
import importlib
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def import_train_clip():
    if str(EXAMPLES) not in sys.path:  # as when it runs as a script: its folder holds shapes_data.py
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module("train_clip")


def tiny_args(steps: int, batch_size: int, train_size: int, eval_size: int) -> list:
    return ["--model", "tiny", "--steps", str(steps), "--batch-size", str(batch_size), "--train-size",
            str(train_size), "--eval-size", str(eval_size), "--warmup", "10", "--lr", "3e-3", "--quiet"]
