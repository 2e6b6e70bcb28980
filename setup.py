"""Build script: the pure-Python package, plus the optional CUDA extension vlfast._C.

Deliberately does not import torch: pip's build isolation often has no torch, and vlfast._C links
only the CUDA runtime and pybind11 (CMakeLists.txt, csrc/). Package metadata lives in pyproject.toml.

Environment:
  VLFAST_BUILD_CUDA  auto (default): build vlfast._C when nvcc is found; a missing nvcc or a failed
                     build prints a warning and installs the pure-Python package.
                     1: build it, and fail the install if that fails.  0: do not build it.
  VLFAST_CUDA_ARCHS  CMake's CUDA architectures, default "80;90a" (A100, H100/H200).
  MAX_JOBS           parallel compile jobs (default: ninja's, about the number of cores).
  CUDACXX / CUDA_HOME  where nvcc is, when it is not on PATH.

What happened is recorded in vlfast/_build_cuda.json, which `python -m vlfast info` reports.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"
STATUS_FILE = "_build_cuda.json"  # vlfast._backends reads it


def _mode() -> str:
    mode = os.environ.get("VLFAST_BUILD_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"VLFAST_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    return mode


def _archs() -> str:
    raw = os.environ.get("VLFAST_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    return ";".join(a for a in raw.replace(",", ";").replace(" ", ";").split(";") if a)


def _find_nvcc():
    """CUDACXX when set (and nothing else: an explicit choice), else PATH, CUDA_HOME, /usr/local/cuda."""
    if os.environ.get("CUDACXX"):
        candidates = [os.environ["CUDACXX"]]
    else:
        candidates = [shutil.which("nvcc")] + [os.path.join(home, "bin", "nvcc") for home in
                                               (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                                                "/usr/local/cuda") if home]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _find_ninja():
    try:
        import ninja  # the PyPI package: a build requirement in pyproject.toml
        path = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.isfile(path):
            return path
    except ImportError:
        pass
    return shutil.which("ninja")


def _pybind11_cmake_dir():
    try:
        import pybind11  # a build requirement in pyproject.toml
    except ImportError:
        return None
    return pybind11.get_cmake_dir()


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles (CMakeLists.txt at the repository root)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildCuda(build_ext):
    """Builds vlfast._C with CMake + ninja, or records why it did not."""

    def run(self):
        mode = _mode()
        if mode == "0":
            return self._skip(mode, "VLFAST_BUILD_CUDA=0 was set when vlfast was installed")
        why_not = None
        if _find_nvcc() is None:
            why_not = ("nvcc was not found when vlfast was installed (put the CUDA toolkit's bin/ on PATH, "
                       "or set CUDA_HOME or CUDACXX, then reinstall)")
        elif shutil.which("cmake") is None:
            why_not = "cmake was not found when vlfast was installed (pip install cmake, then reinstall)"
        elif _pybind11_cmake_dir() is None:
            why_not = "pybind11 was not installed when vlfast was installed (pip install pybind11, then reinstall)"
        if why_not is not None:
            if mode == "1":
                raise SystemExit(f"VLFAST_BUILD_CUDA=1: cannot build vlfast._C: {why_not}")
            return self._skip(mode, why_not)
        try:
            super().run()
        except (subprocess.CalledProcessError, OSError) as e:
            if mode == "1":
                raise SystemExit(f"VLFAST_BUILD_CUDA=1: building vlfast._C failed: {e}") from e
            self._skip(mode, f"its build failed when vlfast was installed ({e}); "
                             f"reinstall with VLFAST_BUILD_CUDA=1 and pip -v to see the compiler's output")

    def build_extension(self, ext):
        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = self._build_dir()
        archs = _archs()
        configure = ["cmake", "-S", str(ROOT), "-B", str(build_dir),
                     "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
                     f"-DCMAKE_CUDA_COMPILER={_find_nvcc()}",
                     f"-DVLFAST_OUTPUT_DIR={out_file.parent}",
                     f"-DPython_EXECUTABLE={sys.executable}",
                     # passed each time: pip's isolated build environments live in new folders
                     f"-Dpybind11_DIR={_pybind11_cmake_dir()}"]
        ninja = _find_ninja()
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        else:
            print("vlfast: ninja not found; building vlfast._C with CMake's default generator", file=sys.stderr)
        build = ["cmake", "--build", str(build_dir), "--target", "_C"]
        if os.environ.get("MAX_JOBS"):
            build += ["--parallel", os.environ["MAX_JOBS"]]
        start = time.monotonic()
        print(f"vlfast: building vlfast._C for CUDA architectures {archs} in {build_dir}", file=sys.stderr)
        subprocess.run(configure, check=True)
        subprocess.run(build, check=True)
        if not out_file.is_file():
            raise OSError(f"CMake finished but {out_file} is missing")
        print(f"vlfast: built {out_file.name} in {time.monotonic() - start:.0f} s", file=sys.stderr)
        self._record(out_file.parent, {"built": True, "archs": archs.split(";"), "reason": None})

    def _skip(self, mode: str, reason: str):
        print(f"vlfast: WARNING: not building the CUDA extension vlfast._C: {reason}. "
              "vlfast installs without it; impl='cuda' will say why.", file=sys.stderr)
        # A vlfast/_C*.so left by an earlier build stays, and still loads; `vlfast info` says so.
        for ext in self.extensions:
            self._record(Path(self.get_ext_fullpath(ext.name)).resolve().parent,
                         {"built": False, "archs": None, "reason": reason, "mode": mode})
        self.extensions = []  # nothing for setuptools to copy or package

    def _build_dir(self) -> Path:
        """A build folder kept between installs (rebuilds are incremental), one per environment."""
        key = hashlib.sha1(os.path.realpath(sys.prefix).encode()).hexdigest()[:8]
        kept = ROOT / "build" / f"cuda-py{sys.version_info[0]}{sys.version_info[1]}-{key}"
        try:
            kept.mkdir(parents=True, exist_ok=True)
            return kept
        except OSError:  # a read-only source tree: setuptools' temporary folder
            return Path(self.build_temp).resolve() / "cuda"

    @staticmethod
    def _record(where: Path, status: dict):
        """What happened, for vlfast._backends: next to the module, and in the source tree, which
        editable installs load from (setuptools copies the module there, not this file)."""
        for folder in {where, ROOT / "vlfast"}:
            if folder.is_dir():
                (folder / STATUS_FILE).write_text(json.dumps(status) + "\n")


class WheelTaggedByBuild(bdist_wheel):
    """A wheel is tagged for a platform only when it carries vlfast._C; without it, py3-none-any."""

    def run(self):
        self.run_command("build")
        if not self.get_finalized_command("build_ext").extensions:  # BuildCuda._skip emptied the list
            self.root_is_pure = True
            self.distribution.ext_modules = []  # so that install puts the package in purelib
        super().run()


setup(ext_modules=[CMakeExtension("vlfast._C")],
      cmdclass={"build_ext": BuildCuda, "bdist_wheel": WheelTaggedByBuild})
