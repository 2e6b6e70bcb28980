"""nvcc for the CUDA compile tests: where it is, and one compile of a csrc/ source returning its log
(ptxas -v goes to stderr), failing the test with the compiler's message."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]
NVCC: Optional[str] = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if os.path.isfile("/usr/local/cuda/bin/nvcc") else None)


def compile_source(source: Path, *args: str) -> str:
    """stdout + stderr of nvcc -std=c++17 -O3 -I csrc *args source."""
    out = subprocess.run([NVCC, "-std=c++17", "-O3", f"-I{ROOT / 'csrc'}", *args, str(source)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr
