"""Builds vlfast._C's sources for the CPU (shim.h, ptx.cuh beside this file) into an importable module.

    python -m tests.tools.cuda_emu.build [OUT_DIR]     # prints the module's path

The sources are copied and adjusted as text (the CUDA-only syntax: the dynamic shared-memory
declaration, <<<...>>> launches, the PTX header, CUDA's own headers), then compiled by g++ with
pybind11. Used by tests/test_cuda_emulation.py.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC = HERE.parents[2] / "csrc"
SOURCES = ["check.cpp", "build_info.cu", "clip_loss/args.cpp", "clip_loss/positive.cu", "clip_loss/stats.cu",
           "clip_loss/grad.cu", "codebook_lookup/split.cu", "codebook_lookup/scan.cu", "codebook_lookup/distances.cu",
           "attention_decode/forward.cpp", "attention_decode/split.cu", "attention_decode/merge.cu",
           "similarity_topk/emit.cu", "similarity_topk/pair_scores.cu", "bindings.cpp"]
LAUNCH = re.compile(r"([\w:]+(?:<[^;()]*?>)?)<<<(.*?),\s*(.*?),\s*(.*?),\s*(.*?)>>>\(", re.S)


def _adapt(text: str) -> str:
    text = text.replace('#include "ptx.cuh"', f'#include "{HERE / "ptx.cuh"}"')
    for header in ("<cuda_runtime_api.h>", "<cuda_bf16.h>", "<cuda_fp16.h>"):
        text = text.replace(f"#include {header}", "")
    text = text.replace("extern __shared__ __align__(16) char smem[];", "char* smem = EMU_SMEM;")
    return LAUNCH.sub(lambda m: f"emu::launch({m[1]}, dim3({m[2]}), dim3({m[3]}), {m[4]}, ", text)


def build(out_dir: Path) -> Path:
    """Compiles the module into out_dir and returns its path."""
    import pybind11
    src = out_dir / "csrc"
    shutil.copytree(CSRC, src, dirs_exist_ok=True)
    for path in src.rglob("*"):
        if path.suffix in (".h", ".cuh", ".cu", ".cpp"):
            path.write_text(_adapt(path.read_text()))
    module = out_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    cuda_include = next((p for p in ("/usr/local/cuda/include",) if Path(p, "nvtx3").is_dir()), None)
    cmd = ["g++", "-O1", "-std=c++20", "-pthread", "-fPIC", "-shared", "-w", "-x", "c++",
           "-include", str(HERE / "shim.h"),
           "-D__CUDACC_VER_MAJOR__=0", "-D__CUDACC_VER_MINOR__=0", "-D__CUDACC_VER_BUILD__=0",
           f"-I{src}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
    if cuda_include:  # NVTX3's headers; they come with CUDA
        cmd.append(f"-I{cuda_include}")
    cmd += [str(src / s) for s in SOURCES] + ["-o", str(module), "-ldl"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"g++ failed building the emulated vlfast._C:\n{out.stderr[-5000:]}")
    return module


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="vlfast-emu-"))
    print(build(out))
