"""vlfast/bench/bench_dalle.py at tiny size: every contender runs, and the peers compute what vlfast does."""
import torch

from vlfast.bench import bench_dalle as B
from vlfast.bench import runner


def test_tiny_bench_rows():
    rows = []
    runner.run_op(B.OP, B, torch.device("cpu"), "tiny", {}, rows.append)
    ran = {(r["case"].split("-")[0], r["impl"]): r for r in rows}
    for impl in ("vlfast-DALLE", "sdpa[dense masks]"):
        r = ran[("train", impl)]
        assert r["status"] == "ok" and r["mode"] == "fwd+bwd" and r["error"] < 1e-5, r  # float32 vs float64
    assert ran[("train", "flex[compiled]")]["status"] == "skipped"
    for impl in ("vlfast-DALLE.generate", "dense-mask cache", "no-cache"):
        r = ran[("sample", impl)]
        assert r["status"] == "ok" and r["error"] == 0.0 and r["tokens_per_s"] > 0, r  # the same greedy tokens
