"""The codebook-lookup kernels compile for sm_90a and sm_80 on this CPU-only machine: tensor cores,
pipelined code tiles, no spills, shared memory within each GPU's limit: what the interpreter cannot
check. The compiles run in a subprocess, because the interpreter (on in this test session) replaces
@triton.jit functions; Triton's cache shares them with tests/ops/test_triton_compiles.py."""
import pytest

from ..tools.triton_aot import compile_in_child

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.aot]
# Largest dynamic shared memory of one block: H100/H200 (sm_90) and A100 (sm_80).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


@pytest.fixture(scope="module")
def compiled():
    return compile_in_child("--op", "codebook_lookup")


def test_every_variant_compiles(compiled):
    failures = [r for r in compiled if "error" in r]
    assert len(compiled) == 18 and not failures, failures


def test_scan_uses_tensor_cores_and_pipelined_loads(compiled):
    for r in compiled:
        if r["variant"].startswith("scan"):
            assert r["async_copies"] > 0, f"code tiles are not pipelined: {r}"
            assert (r["wgmma"] if r["capability"] == 90 else r["mma_sync"]) > 0, f"no tensor cores: {r}"


def test_fits_registers_and_shared_memory(compiled):
    for r in compiled:
        assert r["shared_bytes"] <= SHARED_LIMIT[r["capability"]], f"too much shared memory: {r}"
        if r["capability"] == 90 and r["spill_bytes"] is not None:
            assert r["spill_bytes"] <= 64, f"register spills: {r}"
