"""similarity_topk's CUDA filter kernel (csrc/similarity_topk/emit.cu) compiles for sm_90a and sm_80 as
designed, on a machine without a GPU: tensor-core mma.sync, ldmatrix and cp.async in its code, a warp
vote and atomics in its epilogue, and no register spills at two blocks per SM (128 registers), where
the tile's 64 fp32 inner products per thread and its rows' 8 thresholds only just fit. ptxas -v says so.
The candidates' float64 scorer (pair_scores.cu) must give the definition's bits: its PTX rounds every
f64 product and sum on its own (no fma.rn.f64, even at nvcc's default -fmad=true), without spills."""
import re
from pathlib import Path

import pytest

from ..tools.nvcc import NVCC, ROOT, compile_source

pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")
EMIT = ROOT / "csrc" / "similarity_topk" / "emit.cu"
PAIR_SCORES = ROOT / "csrc" / "similarity_topk" / "pair_scores.cu"


def _nvcc(*args: str, source: Path = EMIT) -> str:
    return compile_source(source, *args)


def test_emit_kernel_fits_registers_on_sm90a_and_sm80(tmp_path):
    log = _nvcc("-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_80,code=sm_80",
                "-Xptxas", "-v", "-c", "-o", str(tmp_path / "emit.o"))
    kernels = re.findall(r"Compiling entry function '(\w*emit_kernel\w*)' for '(sm_\w+)'\n"
                         r"(?:.*Function properties.*\n)?(.*spill.*)\n.*Used (\d+) registers", log)
    assert len(kernels) == 4, log  # fp16 and bf16 (fp32 runs the bf16 kernel) x two architectures
    for name, arch, spills, registers in kernels:
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in spills, f"{arch} {name}: {spills}"
        assert int(registers) <= 128, f"{arch} {name}: {registers} registers"


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_emit_uses_tensor_cores_async_copies_a_vote_and_atomics(tmp_path, arch):
    ptx = tmp_path / "emit.ptx"
    _nvcc(f"-arch={arch}", "-ptx", "-o", str(ptx))
    text = ptx.read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in text
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in text and "cp.async.cg.shared.global" in text
    assert "vote.sync.any.pred" in text  # the skip of tiles where nothing qualifies
    assert re.search(r"atom\.global\.add\.u32|red\.global\.add\.u32|atom\.global\.add\.s32", text), "no atomics"
    assert "ld.local" not in text and "st.local" not in text  # acc is never indexed dynamically


def test_pair_score_ptx_rounds_every_f64_product_and_sum(tmp_path):
    ptx = tmp_path / "pair_scores.ptx"
    _nvcc("-arch=sm_90a", "-ptx", "-o", str(ptx), source=PAIR_SCORES)
    text = ptx.read_text()
    assert len(re.findall(r"\.entry \w*pair_score_kernel", text)) == 9  # 3 dtypes x 3 metrics
    assert "fma.rn.f64" not in text and not re.search(r"\bfma\.\w+\.f64", text)  # one rounding: other bits
    assert "add.rn.f64" in text and "mul.rn.f64" in text and "sub.rn.f64" in text  # l2's differences
    assert "ld.local" not in text and "st.local" not in text


def test_pair_score_kernel_compiles_without_spills_on_sm90a_and_sm80(tmp_path):
    log = _nvcc("-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_80,code=sm_80",
                "-Xptxas", "-v", "-c", "-o", str(tmp_path / "pair_scores.o"), source=PAIR_SCORES)
    kernels = re.findall(r"Compiling entry function '(\w*pair_score_kernel\w*)' for '(sm_\w+)'\n"
                         r"(?:.*Function properties.*\n)?(.*spill.*)\n.*Used (\d+) registers", log)
    assert len(kernels) == 18, log  # 3 dtypes x 3 metrics x two architectures
    for name, arch, spills, registers in kernels:
        assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in spills, f"{arch} {name}: {spills}"
        assert int(registers) <= 64, f"{arch} {name}: {registers} registers"  # 8 blocks of 256 per SM
