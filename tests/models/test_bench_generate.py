"""vlfast/bench/bench_generate.py at tiny size: both contenders run and vlfast's greedy tokens are
transformers'."""
import pytest
import torch

pytest.importorskip("transformers", reason="the benchmark's peer is transformers' generate()")

from vlfast.bench import bench_generate as B  # noqa: E402
from vlfast.bench import runner  # noqa: E402


def test_tiny_run_rows():
    rows = []
    runner.run_op(B.OP, B, torch.device("cpu"), "tiny", {}, rows.append)
    ran = {r["impl"]: r for r in rows}
    assert set(ran) == {"vlfast-Llama.generate", "transformers-generate[sdpa]"}
    for r in ran.values():
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["config"], r
        assert r["error"] == 0.0  # the same greedy tokens as transformers
