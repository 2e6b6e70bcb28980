"""vlfast's Triton kernels compile for sm_90a and sm_80 on this CPU-only machine, with tensor
cores and pipelined loads: what the interpreter cannot check. The compiles run in a subprocess,
because the interpreter (on in this test session) replaces @triton.jit functions."""
import pytest

from ..tools.triton_aot import compile_in_child

pytest.importorskip("triton")
pytestmark = [pytest.mark.triton, pytest.mark.aot]


@pytest.fixture(scope="module")
def compiled():
    return compile_in_child()


def test_every_variant_compiles(compiled):
    failures = [r for r in compiled if "error" in r]
    assert compiled and not failures, failures


def test_tensor_cores_and_pipelined_loads(compiled):
    for r in compiled:
        if r["variant"].startswith("decode split"):  # memory-bound, but its tiles are tensor-core dots too
            assert r["async_copies"] > 0 and r["mma_sync"] + r["wgmma"] > 0, f"decode: {r}"
            continue
        if not r["variant"].startswith(("stats", "grad", "attn", "dw_acc")):
            continue  # only the GEMM-tile kernels use tensor cores
        if r["variant"].startswith(("attn fwd-tma", "attn dq-tma", "attn dkdv-tma")):  # TMA on Hopper only
            assert r["capability"] != 90 or (r["tma"] > 0 and r["wgmma"] > 0), f"no TMA copies: {r}"
            continue
        if not r["variant"].endswith("maskedK"):  # odd D: rows too unaligned for async copies
            assert r["async_copies"] > 0, f"global loads are not pipelined: {r}"
        if r["variant"].endswith("fp32-ieee"):
            continue  # exact fp32 runs on the FMA units by design
        mma = r["wgmma"] if r["capability"] == 90 else r["mma_sync"]
        assert mma > 0, f"no tensor-core instructions: {r}"


def test_default_configs_fit_in_registers_on_hopper(compiled):
    """Spills are the first thing that would make these kernels slow; allow a few bytes of stack."""
    for r in compiled:
        if r["capability"] == 90 and r.get("spill_bytes") is not None and not r["variant"].endswith("maskedK"):
            # attention's dK/dV kernel holds two (BN, D) fp32 accumulators: ~100 B of stack at D >= 128
            limit = 256 if r["variant"].startswith("attn dkdv") else 64
            assert r["spill_bytes"] <= limit, f"register spills: {r}"
