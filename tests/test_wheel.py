"""A wheel built without the CUDA extension is pure Python, carries the benchmarks, and runs
`python -m vlfast bench` from a plain (non-editable) install, away from the source checkout."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.skip("needs git to copy the tracked source tree")
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tracked files, so the build neither sees nor writes the checkout's build products.
    src = out / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = dict(os.environ, VLFAST_BUILD_CUDA="0")
    # No build isolation: setuptools and wheel are the ones installed here (no network needed).
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                            str(out / "dist"), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    (path,) = (out / "dist").glob("vlfast-*.whl")
    return path


def test_wheel_without_the_extension_is_pure_python(wheel):
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/WHEEL"))).decode()
    assert "Root-Is-Purelib: true" in meta
    assert "vlfast/bench/runner.py" in names and "vlfast/bench/bench_clip_loss.py" in names
    assert not any(n.startswith("benchmarks/") for n in names)
    assert not any(n.endswith(".so") for n in names)


def test_bench_runs_from_the_installed_wheel(wheel, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("TRITON_INTERPRET", None)
    where = subprocess.run([sys.executable, "-c", "import vlfast; print(vlfast.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=120)
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr  # the wheel's copy, not the checkout
    run = subprocess.run([sys.executable, "-m", "vlfast", "bench", "clip_loss", "--tiny", "--device", "cpu"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "vlfast-torch" in run.stdout
