"""benchmarks/bench_clip_model.py runs as `python -m vlfast bench clip_model` (tiny sizes, CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the benchmark's peer is transformers' CLIPModel")
ROOT = Path(__file__).resolve().parents[2]


def test_tiny_bench_rows(tmp_path):
    path = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, "-m", "vlfast", "bench", "clip_model", "--tiny", "--device", "cpu",
                          "--json", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["impl"]: r for r in json.loads(path.read_text())}
    assert set(rows) == {"vlfast-CLIP", "transformers-sdpa"}
    for r in rows.values():
        assert r["status"] == "ok" and r["ms"] > 0 and r["tflops"] > 0, r
        assert r["error_ref"] == "float64 forward of transformers' CLIPModel"
        assert r["error"] < 1e-5  # float32 step against float64: both compute the same loss
