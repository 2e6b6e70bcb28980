"""vlfast/bench/bench_dalle.py runs as `python -m vlfast bench dalle` (tiny sizes, CPU)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_tiny_bench_rows(tmp_path):
    path = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, "-m", "vlfast", "bench", "dalle", "--tiny", "--device", "cpu",
                          "--json", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {(r["case"].split("-")[0], r["impl"]): r for r in json.loads(path.read_text())}
    for impl in ("vlfast-DALLE", "sdpa[dense masks]"):
        r = rows[("train", impl)]
        assert r["status"] == "ok" and r["mode"] == "fwd+bwd" and r["error"] < 1e-5, r  # float32 vs float64
    assert rows[("train", "flex[compiled]")]["status"] == "skipped"
    for impl in ("vlfast-DALLE.generate", "dense-mask cache", "no-cache"):
        r = rows[("sample", impl)]
        assert r["status"] == "ok" and r["error"] == 0.0 and r["tokens_per_s"] > 0, r  # the same greedy tokens
