"""similarity_topk's emit kernel compiles for sm_90a and sm_80 on this CPU-only machine: tensor cores
(wgmma on Hopper), pipelined key tiles, no spills, shared memory within each GPU's limit: what the
interpreter cannot check. The compiles run in a subprocess, because the interpreter (on in this test
session) replaces @triton.jit functions."""
import subprocess
import sys

import pytest

from ..tools.triton_aot import ROOT, child_env, compile_in_child

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.aot]
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}  # largest dynamic shared memory of a block


@pytest.fixture(scope="module")
def compiled():
    return compile_in_child("--op", "similarity_topk")


def test_every_variant_compiles(compiled):
    failures = [r for r in compiled if "error" in r]
    assert len(compiled) == 20 and not failures, failures  # 7 emit + 3 pair-score variants x 2 architectures


def test_tensor_cores_pipelined_loads_and_no_spills(compiled):
    for r in compiled:
        if r["variant"].startswith("emit"):
            assert r["async_copies"] > 0, f"key tiles are not pipelined: {r}"
            assert (r["wgmma"] if r["capability"] == 90 else r["mma_sync"]) > 0, f"no tensor cores: {r}"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["capability"]], f"too much shared memory: {r}"
        if r["spill_bytes"] is not None:
            assert r["spill_bytes"] == 0, f"register spills: {r}"


PAIR_SCORE_PTX = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tests.tools.triton_aot import jit_function, signature
from vlfast.ops.similarity_topk import triton as K
fn = jit_function(K._pair_score_kernel)
for metric in (0, 1, 2):
    sig = signature(K._pair_score_kernel, {"q_ptr": "bf16", "k_ptr": "bf16", "row_ptr": "i64", "col_ptr": "i64",
                                           "out_ptr": "fp64"})
    types = {name: kind.partition(":")[0] for name, kind in sig.items()}
    src = ASTSource(fn, types, {"METRIC": metric, "BP": 128})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "enable_fp_fusion": False}).asm["ptx"]
    print(metric, ptx.count("fma.rn.f64"), ptx.count("add.f64") + ptx.count("add.rn.f64"))
"""


def test_pair_scores_compile_without_fused_multiply_adds():
    """The float64 re-scoring must round each product and each sum as PyTorch does: no fma in its PTX."""
    out = subprocess.run([sys.executable, "-c", PAIR_SCORE_PTX], env=child_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split() for line in out.stdout.splitlines()]
    assert len(rows) == 3, out.stdout
    for metric, fmas, adds in rows:
        assert int(fmas) == 0 and int(adds) > 0, (metric, fmas, adds)
