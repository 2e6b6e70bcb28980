"""vlfast/bench/bench_similarity_topk.py runs as `python -m vlfast bench similarity_topk` (tiny sizes, CPU)."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from vlfast.bench import bench_similarity_topk as bench

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_bench_rows(tmp_path):
    path = tmp_path / "rows.json"
    out = subprocess.run([sys.executable, "-m", "vlfast", "bench", "similarity_topk", "--tiny", "--device", "cpu",
                          "--json", str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {r["impl"]: r for r in json.loads(path.read_text())}
    assert rows["vlfast-torch"]["status"] == "ok" and rows["vlfast-torch"]["errors"]["index_mismatch"] == 0.0
    for name in ("torch-matmul+topk", "torch-fp32-matmul+topk"):
        assert rows[name]["status"] == "ok" and rows[name]["ms"] > 0 and rows[name]["tflops"] > 0, rows[name]
    assert rows["vlfast-triton"]["status"] == "skipped"


def test_oracle_breaks_ties_to_the_lower_index_and_sees_every_block(monkeypatch):
    monkeypatch.setattr(bench, "ORACLE_BLOCK_BYTES", 8 * 7 * 3)  # 3 rows per float64 block
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    index, score = bench.oracle(q, keys, 4)
    dense = q.double() @ keys.double().T
    for row in range(q.shape[0]):  # the k best by score, then by index
        want = sorted(range(7), key=lambda j: (-float(dense[row, j]), j))[:4]
        assert index[row].tolist() == want
        assert score[row].tolist() == [float(dense[row, j]) for j in want]
