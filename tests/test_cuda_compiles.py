"""The codebook scan compiles for sm_90a and sm_80 as designed, on a machine without a GPU: tensor-core
mma.sync and cp.async in its code, and no register spills at two blocks per SM (128 registers), which
its 8 x 8 fragments per thread plus a running best/second per row only just fit. ptxas -v says so."""
import re
from pathlib import Path

import pytest

from .tools.nvcc import NVCC, ROOT, compile_source

pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")
SCAN = ROOT / "csrc" / "codebook_lookup" / "scan.cu"


def _nvcc(*args: str, source: Path = SCAN) -> str:
    return compile_source(source, *args)


def test_scan_kernel_fits_registers_on_sm90a_and_sm80(tmp_path):
    log = _nvcc("-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_80,code=sm_80",
                "-Xptxas", "-v", "-c", "-o", str(tmp_path / "scan.o"))
    kernels = re.findall(r"Compiling entry function '(\w*scan_kernel\w*)' for '(sm_\w+)'\n"
                         r"(?:.*Function properties.*\n)?(.*spill.*)\n.*Used (\d+) registers", log)
    assert len(kernels) == 4, log  # fp16 and bf16 (fp32 runs the bf16 kernel) x two architectures
    for name, arch, spills, registers in kernels:
        assert "0 bytes spill stores, 0 bytes spill loads" in spills, f"{arch} {name}: {spills}"
        assert int(registers) <= 128, f"{arch} {name}: {registers} registers"


def test_scan_uses_tensor_cores_and_async_copies(tmp_path):
    ptx = tmp_path / "scan.ptx"
    _nvcc("-arch=sm_90a", "-ptx", "-o", str(ptx))
    text = ptx.read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32" in text
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in text
    assert "ldmatrix.sync.aligned.m8n8.x4.shared.b16" in text and "cp.async.cg.shared.global" in text


@pytest.mark.parametrize("source", ["split.cu", "merge.cu"])
def test_decode_attention_kernels_fit_registers_on_sm90a_and_sm80(tmp_path, source):
    """attention_decode's split kernel (3 dtypes x 3 dims-per-lane x vector or element loads) and merge
    kernel (3 dtypes):
    no spills, and at most 128 registers so that two 256-thread CTAs fit an SM."""
    log = _nvcc("-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_80,code=sm_80",
                "-Xptxas", "-v", "-c", "-o", str(tmp_path / "decode.o"),
                source=ROOT / "csrc" / "attention_decode" / source)
    kernels = re.findall(r"Compiling entry function '(\w*(?:split|merge)_kernel\w*)' for '(sm_\w+)'\n"
                         r"(?:.*Function properties.*\n)?(.*spill.*)\n.*Used (\d+) registers", log)
    assert len(kernels) == (36 if source == "split.cu" else 6), log
    for name, arch, spills, registers in kernels:
        assert "0 bytes spill stores, 0 bytes spill loads" in spills, f"{arch} {name}: {spills}"
        assert int(registers) <= 128, f"{arch} {name}: {registers} registers"
