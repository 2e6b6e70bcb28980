"""vlfast/bench/bench_similarity_topk.py at tiny size, and its float64 oracle."""
import torch

from vlfast.bench import bench_similarity_topk as bench
from vlfast.bench import runner


def test_tiny_bench_rows():
    rows = []
    runner.run_op(bench.OP, bench, torch.device("cpu"), "tiny", {}, rows.append)
    ran = {r["impl"]: r for r in rows}
    assert ran["vlfast-torch"]["status"] == "ok" and ran["vlfast-torch"]["errors"]["index_mismatch"] == 0.0
    for name in ("torch-matmul+topk", "torch-fp32-matmul+topk"):
        assert ran[name]["status"] == "ok" and ran[name]["ms"] > 0 and ran[name]["tflops"] > 0, ran[name]
    assert ran["vlfast-triton"]["status"] == "skipped"


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
