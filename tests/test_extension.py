"""vlfast._C without a GPU: it is built where nvcc is, imports, says what it was built with, links no
libtorch, checks every argument with an error naming it, and fails clearly when there is no GPU.
The kernels' numerics are tested on a GPU (tests/ops/test_clip_loss_cuda_gpu.py).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import vlfast
from vlfast import ImplUnavailableError
from vlfast._backends import _not_built_reason, extension

ROOT = Path(__file__).resolve().parent.parent
_C, WHY_NOT = extension()
NO_GPU = not torch.cuda.is_available()


def _nvcc_present() -> bool:
    return bool(shutil.which("nvcc") or os.path.isfile("/usr/local/cuda/bin/nvcc"))


@pytest.fixture(scope="module")
def C():
    if _C is not None:
        return _C
    if not _nvcc_present() or os.environ.get("VLFAST_BUILD_CUDA") == "0":
        pytest.skip(f"no nvcc here (or VLFAST_BUILD_CUDA=0): {WHY_NOT}")
    pytest.fail(f"nvcc is on this machine but vlfast._C is not built ({WHY_NOT}); "
                "VLFAST_BUILD_CUDA=1 pip install -e . builds it")


def test_extension_is_built_where_nvcc_is(C):
    assert C.OPS == ("clip_loss", "codebook_lookup", "attention_decode", "similarity_topk")


def test_build_info_matches_the_requested_archs(C):
    info = C.build_info()
    status = ROOT / "vlfast" / "_build_cuda.json"  # what setup.py asked CMake for when it built this
    recorded = json.loads(status.read_text()) if status.is_file() else {}
    requested = recorded.get("archs") or (os.environ.get("VLFAST_CUDA_ARCHS") or "80;90a").split(";")
    assert info["archs"] == requested
    # what nvcc compiled for (__CUDA_ARCH_LIST__): the same numbers, without the "a" of arch-specific targets
    assert info["arch_list"] == [int(a.rstrip("a")) * 10 for a in info["archs"]]
    assert info["cudart"] == "static"
    assert info["cuda"].count(".") == 1 and info["nvcc"].startswith(info["cuda"])
    assert "NVTX3" in info["nvtx"]


def test_links_neither_libtorch_nor_a_shared_cuda_runtime(C):
    """One build serves every torch version: the module depends on libc/libstdc++ only."""
    if shutil.which("ldd") is None:
        pytest.skip("no ldd")
    libs = subprocess.run(["ldd", C.__file__], capture_output=True, text=True, check=True).stdout
    for forbidden in ("libtorch", "libc10", "libcudart", "libpython"):
        assert forbidden not in libs, libs


def test_info_reports_the_build(C):
    from vlfast import _info
    info = _info.collect()["extension"]
    assert info["built"] and info["archs"] == C.build_info()["archs"] and info["ops"] == list(C.OPS)
    assert f"vlfast._C built for sm_{', sm_'.join(info['archs'])}" in _info.format_report(_info.collect())


# --- argument checks: every binding, before anything touches CUDA --------------------------------

A, B, OUT, S, P1, P2, G, ST, EM, W = ((i + 1) << 20 for i in range(10))  # 16-byte aligned fake addresses
COMMON = dict(scale=S, bias=0, d=64, stride_a=64, stride_b=64, dtype=2, device=0, stream=0)
CODEBOOK = dict(n=8, k=300, d=64, stride_z=64, stride_e=64, dtype=2, device=0, stream=0)
CALLS = {
    "clip_loss_positive": dict(a=A, b=B, out=OUT, n=8, m=8, offset=0, **COMMON),
    "clip_loss_stats": dict(a=A, b=B, pos=OUT, row_part=P1, col_part=P2, n=8, m=8, offset=0, cols_per_split=128,
                            splits=1, sigmoid=False, symmetric=True, **COMMON),
    "clip_loss_grad": dict(a=A, b=B, g=G, stats=ST, em=EM, w=W, ds_part=P1, db_part=P2, c=8, n=8, m=8, r0=0,
                           offset=0, stride_g=64, parts=1, sigmoid=False, symmetric=True, **COMMON),
    "codebook_lookup_scan": dict(z=A, e=B, alpha=S, beta=W, best=P1, second=P2, index=OUT, work=0, work_size=0,
                                 codes_per_split=128, splits=3, **CODEBOOK),
    "codebook_lookup_distances": dict(z=A, e=B, index=ST, out=OUT, cosine=False, **CODEBOOK),
    "similarity_topk_emit": dict(q=A, keys=B, alpha=S, beta=W, threshold=ST, count=OUT, cols=P1, scores=P2, work=0,
                                 work_size=0, n=8, m=300, d=64, stride_q=64, stride_k=64, capacity=16,
                                 keys_per_split=128, splits=3, dtype=2, device=0, stream=0),
    "similarity_topk_pair_scores": dict(q=A, keys=B, row=P1, col=P2, out=OUT, p=100, n=8, m=300, d=64, stride_q=64,
                                        stride_k=64, metric=0, dtype=2, device=0, stream=0),
}
BAD = [  # (argument, value, message[, the one binding it is for]), else for every binding that takes the argument
    ("a", 0, "argument 'a' is a null pointer"),
    ("a", A + 2, "argument 'a' must be 16-byte aligned"),
    ("b", B + 8, "argument 'b' must be 16-byte aligned"),
    ("scale", 0, "argument 'scale' is a null pointer"),
    ("scale", S + 1, "argument 'scale' must be 4-byte aligned"),
    ("bias", S + 2, "argument 'bias' must be 4-byte aligned"),
    ("out", 0, "argument 'out' is a null pointer"),
    ("row_part", 0, "argument 'row_part' is a null pointer"),
    ("col_part", 0, "argument 'col_part' is a null pointer"),
    ("g", G + 4, "argument 'g' must be 16-byte aligned"),
    ("ds_part", 0, "argument 'ds_part' is a null pointer"),
    ("n", -3, "argument 'n' must be >= 1"),
    ("m", 0, "argument 'm' must be >= 1"),
    ("d", -1, "argument 'd' must be >= 1"),
    ("c", 0, "argument 'c' must be >= 1"),
    ("dtype", 7, "argument 'dtype' must be a dtype code"),
    ("dtype", -1, "argument 'dtype' must be a dtype code"),
    ("stride_a", 68, "argument 'a': rows must start on 16-byte boundaries"),
    ("stride_b", 32, "argument 'b': the row stride"),
    ("stride_g", 4, "argument 'g': the row stride"),
    ("offset", 3, "argument 'offset' must be -1 or in"),
    ("offset", -1, "only the sigmoid loss allows"),
    ("cols_per_split", 100, "argument 'cols_per_split' must be a multiple of 128"),
    ("splits", 2, "argument 'splits' must be ceil(. / .*_per_split) = [13] "),
    ("r0", 4, "arguments 'r0' and 'c' must select rows inside"),
    ("parts", 0, "argument 'parts'"),
    ("z", 0, "argument 'z' is a null pointer"),
    ("z", A + 4, "argument 'z' must be 16-byte aligned", "codebook_lookup_scan"),  # 16-bit rows: cp.async
    ("e", B + 2, "argument 'e' must be 16-byte aligned", "codebook_lookup_scan"),
    ("z", A + 1, "argument 'z' must be 2-byte aligned", "codebook_lookup_distances"),  # read element-wise
    ("alpha", 0, "argument 'alpha' is a null pointer"),
    ("beta", W + 2, "argument 'beta' must be 4-byte aligned"),
    ("best", 0, "argument 'best' is a null pointer"),
    ("second", 0, "argument 'second' is a null pointer"),
    ("index", 0, "argument 'index' is a null pointer"),
    ("k", 0, "argument 'k' must be >= 1"),
    ("stride_z", 60, "argument 'z': the row stride"),
    ("stride_e", 68, "argument 'e': rows must start on 16-byte boundaries", "codebook_lookup_scan"),
    ("stride_e", 60, "argument 'e': the row stride"),
    ("codes_per_split", 0, "argument 'codes_per_split' must be >= 1"),
    ("codes_per_split", 100, "argument 'codes_per_split' must be a multiple of 128"),
    ("q", A + 4, "argument 'q' must be 16-byte aligned", "similarity_topk_emit"),  # 16-bit rows: cp.async
    ("keys", 0, "argument 'keys' is a null pointer"),
    ("threshold", 0, "argument 'threshold' is a null pointer"),
    ("count", ST + 2, "argument 'count' must be 4-byte aligned"),
    ("cols", 0, "argument 'cols' is a null pointer"),
    ("scores", 0, "argument 'scores' is a null pointer"),
    ("stride_q", 60, "argument 'q': the row stride"),
    ("stride_k", 68, "argument 'keys': rows must start on 16-byte boundaries", "similarity_topk_emit"),
    ("capacity", -1, "argument 'capacity' must be >= 0"),
    ("keys_per_split", 0, "argument 'keys_per_split' must be >= 1"),
    ("keys_per_split", 100, "argument 'keys_per_split' must be a multiple of 128"),
    ("q", A + 1, "argument 'q' must be 2-byte aligned", "similarity_topk_pair_scores"),  # read element-wise
    ("keys", B + 1, "argument 'keys' must be 2-byte aligned", "similarity_topk_pair_scores"),
    ("stride_k", 60, "argument 'keys': the row stride"),
    ("row", 0, "argument 'row' is a null pointer"),
    ("col", P2 + 4, "argument 'col' must be 8-byte aligned"),  # int64 indices
    ("out", OUT + 4, "argument 'out' must be 8-byte aligned", "similarity_topk_pair_scores"),  # float64
    ("p", 0, "argument 'p' must be >= 1"),
    ("metric", 3, "argument 'metric' must be a metric code: 0 (ip), 1 (cosine) or 2 (l2), got 3"),
    ("metric", -1, "argument 'metric' must be a metric code"),
]


@pytest.mark.parametrize("fn,arg,value,message",
                         [(fn, *bad[:3]) for fn in sorted(CALLS) for bad in BAD
                          if bad[0] in CALLS[fn] and bad[3:] in ((), (fn,))],
                         ids=lambda x: str(x)[:30])
def test_bad_arguments_raise_value_error_naming_them(C, fn, arg, value, message):
    with pytest.raises(ValueError, match=f"^vlfast._C.{fn}: .*{message.replace('(', '.').replace(')', '.')}"):
        getattr(C, fn)(**{**CALLS[fn], arg: value})


def test_layout_rules(C):
    stats = CALLS["clip_loss_stats"]
    with pytest.raises(ValueError, match="'symmetric' needs a square block"):
        C.clip_loss_stats(**{**stats, "m": 130, "splits": 2})
    with pytest.raises(ValueError, match="'symmetric' applies to the softmax loss only"):
        C.clip_loss_stats(**{**stats, "sigmoid": True})
    with pytest.raises(ValueError, match="multiple of 64 .the column tile for float32"):  # its own tile
        C.clip_loss_stats(**{**stats, "dtype": 0, "cols_per_split": 96, "stride_a": 64, "stride_b": 64})


def test_tile_shapes(C):
    codes = C.DTYPE_CODES
    assert set(codes) == {"float32", "float16", "bfloat16"}
    assert C.clip_loss_tile(codes["bfloat16"]) == C.clip_loss_tile(codes["float16"]) == (128, 128)
    assert C.clip_loss_tile(codes["float32"]) == (64, 64)
    assert all(C.codebook_lookup_tile(code) == (128, 128) for code in codes.values())  # fp32 runs on bf16 MMAs
    assert all(C.similarity_topk_tile(code) == (128, 128) for code in codes.values())
    for tile in (C.clip_loss_tile, C.codebook_lookup_tile, C.similarity_topk_tile):
        with pytest.raises(ValueError, match="argument 'dtype'"):
            tile(3)


def test_codebook_scan_rules(C):
    scan = CALLS["codebook_lookup_scan"]
    with pytest.raises(ValueError, match="argument 'splits' must be ceil.k / codes_per_split. = 1 "):
        C.codebook_lookup_scan(**{**scan, "codes_per_split": 384})
    with pytest.raises(ValueError, match="'k' must be at most 2.31 - 1 .indices are int32."):
        C.codebook_lookup_scan(**{**scan, "k": 2**31, "codes_per_split": 2**31, "splits": 1})
    # float32 rows are read element by element (no 16-byte rule), through a scratch of bf16 pieces
    fp32 = {**scan, "dtype": C.DTYPE_CODES["float32"], "z": A + 4, "stride_z": 67, "d": 67, "stride_e": 67}
    with pytest.raises(ValueError, match="argument 'work' is a null pointer"):
        C.codebook_lookup_scan(**fp32)
    need = C.codebook_lookup_work_bytes(n=8, k=300, d=67, dtype=C.DTYPE_CODES["float32"])
    with pytest.raises(ValueError, match=f"argument 'work_size' must be at least .* = {need} for float32"):
        C.codebook_lookup_scan(**{**fp32, "work": G, "work_size": need - 1})
    with pytest.raises(ValueError, match="argument 'z' must be 4-byte aligned"):
        C.codebook_lookup_scan(**{**fp32, "work": G, "work_size": need, "z": A + 2})
    with pytest.raises(ValueError, match="argument 'index' must be 8-byte aligned"):  # int64 indices
        C.codebook_lookup_distances(**{**CALLS["codebook_lookup_distances"], "index": ST + 4})


def test_codebook_work_bytes(C):
    codes = C.DTYPE_CODES
    # (n + k) rows of 3d bf16, each padded to 16 bytes: 3 * 3 = 9 -> 16 elements
    assert C.codebook_lookup_work_bytes(n=10, k=5, d=3, dtype=codes["float32"]) == 15 * 16 * 2
    assert C.codebook_lookup_work_bytes(n=10, k=5, d=3, dtype=codes["bfloat16"]) == 0
    with pytest.raises(ValueError, match="^vlfast._C.codebook_lookup_work_bytes: argument 'd' must be >= 1"):
        C.codebook_lookup_work_bytes(n=10, k=5, d=0, dtype=0)
    with pytest.raises(ValueError, match="too large"):
        C.codebook_lookup_work_bytes(n=2**40, k=2**40, d=2**20, dtype=0)


def test_similarity_topk_emit_rules(C):
    emit = CALLS["similarity_topk_emit"]
    with pytest.raises(ValueError, match="'m' must be at most 2.31 - 1 .key indices are int32."):
        C.similarity_topk_emit(**{**emit, "m": 2**31, "keys_per_split": 2**31, "splits": 1})
    with pytest.raises(ValueError, match="arguments 'n' and 'capacity' are too large"):
        C.similarity_topk_emit(**{**emit, "capacity": 2**62})
    # float32 rows are read element by element (no 16-byte rule), through a scratch of bf16 pieces
    fp32 = {**emit, "dtype": C.DTYPE_CODES["float32"], "q": A + 4, "stride_q": 67, "d": 67, "stride_k": 67}
    with pytest.raises(ValueError, match="argument 'work' is a null pointer"):
        C.similarity_topk_emit(**fp32)
    need = C.similarity_topk_work_bytes(n=8, m=300, d=67, dtype=C.DTYPE_CODES["float32"])
    assert need == C.codebook_lookup_work_bytes(n=8, k=300, d=67, dtype=C.DTYPE_CODES["float32"])
    with pytest.raises(ValueError, match=f"argument 'work_size' must be at least .* = {need} for float32"):
        C.similarity_topk_emit(**{**fp32, "work": G, "work_size": need - 1})
    assert C.similarity_topk_work_bytes(n=8, m=300, d=67, dtype=C.DTYPE_CODES["bfloat16"]) == 0
    with pytest.raises(ValueError, match="^vlfast._C.similarity_topk_work_bytes: argument 'm' must be >= 1"):
        C.similarity_topk_work_bytes(n=8, m=0, d=67, dtype=0)
    with pytest.raises(ValueError, match="arguments 'n', 'm', 'd' are too large: .n . m. rows"):
        C.similarity_topk_work_bytes(n=2**40, m=2**40, d=2**20, dtype=0)
    if NO_GPU:  # capacity 0 counts only: no slots, null cols and scores accepted (then: no device)
        with pytest.raises(RuntimeError, match="no usable CUDA device"):
            C.similarity_topk_emit(**{**emit, "capacity": 0, "cols": 0, "scores": 0})


def test_similarity_topk_pair_scores_rules(C):
    pairs = CALLS["similarity_topk_pair_scores"]
    # rows read one element at a time: float32 rows need only 4-byte alignment, any stride >= d
    fp32 = {**pairs, "dtype": C.DTYPE_CODES["float32"], "q": A + 4, "stride_q": 67, "d": 67, "stride_k": 67}
    with pytest.raises(ValueError, match="argument 'q' must be 4-byte aligned"):
        C.similarity_topk_pair_scores(**{**fp32, "q": A + 2})
    with pytest.raises(ValueError, match="argument 'p' is too large"):
        C.similarity_topk_pair_scores(**{**pairs, "p": 2**61})
    with pytest.raises(ValueError, match="row offsets overflow 64 bits"):
        C.similarity_topk_pair_scores(**{**pairs, "n": 2**40, "stride_q": 2**30})
    if NO_GPU:  # then valid: only the device is missing
        for valid in (fp32, {**pairs, "metric": 1}, {**pairs, "metric": 2, "dtype": 1, "stride_q": 65}):
            with pytest.raises(RuntimeError, match="no usable CUDA device"):
                C.similarity_topk_pair_scores(**valid)


def test_negative_addresses_are_type_errors(C):
    with pytest.raises(TypeError):
        C.clip_loss_positive(**{**CALLS["clip_loss_positive"], "a": -16})


def test_rows_are_laid_out_as_the_kernels_read_them():
    """16-bit rows on 16-byte boundaries (the scan's cp.async); float32 rows only element-aligned;
    overlapping (expanded) rows always copied; values unchanged."""
    from vlfast.ops.codebook_lookup.cuda import kernel_rows
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    assert kernel_rows(x) is x
    for view in (torch.randn(5, 100).bfloat16(), torch.randn(6, 64).bfloat16()[1:], torch.randn(1, 64).expand(5, 64)):
        rows = kernel_rows(view)
        assert torch.equal(rows, view) and rows.stride(1) == 1 and rows.stride(0) >= rows.shape[1]
        if rows.element_size() == 2:
            assert rows.data_ptr() % 16 == 0 and rows.stride(0) % 8 == 0
    x = torch.randn(6, 3)[1:]  # float32, 12-byte rows starting 12 bytes in: as they are
    assert kernel_rows(x) is x


# --- no GPU: a clear error, no crash, no hang -----------------------------------------------------

@pytest.mark.parametrize("fn", sorted(CALLS))
def test_valid_arguments_without_a_gpu_raise_runtime_error(C, fn):
    """Run in a child process: a crash or a hang there fails this test instead of the whole run."""
    script = textwrap.dedent(f"""
        from vlfast import _C
        try:
            _C.{fn}(**{CALLS[fn]!r})
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
        else:
            print("no error")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if NO_GPU:
        assert out.stdout.startswith(f"RuntimeError: vlfast._C.{fn}: no usable CUDA device"), out.stdout
        assert "the CUDA kernels need an NVIDIA GPU" in out.stdout
    else:  # made-up addresses are not device memory
        assert re.match(rf"ValueError: vlfast\._C\.{fn}: argument '\w+' is not device memory", out.stdout), out.stdout


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU-only machine's errors")
def test_clip_loss_impl_cuda_on_cpu_tensors_says_why():
    x = torch.randn(4, 8)
    with pytest.raises(ImplUnavailableError, match="impl='cuda' cannot run here: .*(CUDA tensors|vlfast._C)"):
        vlfast.clip_loss(x, x, 1.0, impl="cuda")
    with pytest.raises(ImplUnavailableError, match="float64"):
        vlfast.clip_loss(x.double(), x.double(), 1.0, impl="cuda")
    from vlfast.ops.clip_loss import cuda
    with pytest.raises(ImplUnavailableError, match="impl='cuda'"):  # the module's entry points check too
        cuda.forward(x, x, torch.tensor(1.0), None, "softmax", True, 0)


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU-only machine's errors")
def test_codebook_lookup_impl_cuda_on_cpu_tensors_says_why():
    x = torch.randn(4, 8)
    with pytest.raises(ImplUnavailableError, match="impl='cuda' cannot run here: .*(CUDA tensors|vlfast._C)"):
        vlfast.codebook_lookup(x, x, impl="cuda")
    with pytest.raises(ImplUnavailableError, match="float64"):
        vlfast.codebook_lookup(x.double(), x.double(), impl="cuda")
    from vlfast.ops.codebook_lookup import cuda
    ones = torch.ones(4)
    with pytest.raises(ImplUnavailableError, match="impl='cuda'"):  # the module's entry points check too
        cuda.scan(x, x, ones, ones)
    with pytest.raises(ImplUnavailableError, match="impl='cuda'"):
        cuda.distances(x, x, torch.zeros(4, dtype=torch.int64), "l2")


@pytest.mark.skipif(not NO_GPU, reason="checks the CPU-only machine's errors")
def test_similarity_topk_cuda_emit_on_cpu_tensors_says_why():
    from vlfast.ops.similarity_topk import cuda
    x, ones = torch.randn(4, 8), torch.ones(4)
    with pytest.raises(ImplUnavailableError, match="vlfast.similarity_topk: impl='cuda' cannot run here"):
        cuda.emit(x, x, ones, ones, ones, 8)
    with pytest.raises(ImplUnavailableError, match="float64"):
        cuda.emit(x.double(), x.double(), ones, ones, ones, 8)
    assert cuda.why_not(torch.device("cpu"), torch.bfloat16) is not None


def test_auto_takes_cuda_only_where_measured_fastest(monkeypatch):
    from vlfast import _dispatch
    everything_runs = {impl: (lambda: None) for impl in vlfast.IMPLS}
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    gpu = torch.device("cuda")
    # as measured on an H100 (benchmarks/results/h100-2026-12-05-quick.json)
    assert _dispatch.AUTO_PREFERS_CUDA == {"clip_loss": False, "codebook_lookup": True}
    assert _dispatch.resolve_impl("codebook_lookup", "auto", gpu, everything_runs) == "cuda"
    assert _dispatch.resolve_impl("clip_loss", "auto", gpu, everything_runs) == "triton"
    assert _dispatch.resolve_impl("clip_loss", "cuda", gpu, everything_runs) == "cuda"
    monkeypatch.setitem(_dispatch.AUTO_PREFERS_CUDA, "clip_loss", True)
    assert _dispatch.resolve_impl("clip_loss", "auto", gpu, everything_runs) == "cuda"
    monkeypatch.setitem(_dispatch.AUTO_PREFERS_CUDA, "codebook_lookup", False)
    assert _dispatch.resolve_impl("codebook_lookup", "auto", gpu, everything_runs) == "triton"


# --- the build's bookkeeping ----------------------------------------------------------------------

def test_the_reason_recorded_at_install_time_is_reported(tmp_path):
    status = tmp_path / "_build_cuda.json"
    status.write_text(json.dumps({"built": False, "reason": "nvcc was not found when vlfast was installed"}))
    assert _not_built_reason(str(status)).endswith("is not built: nvcc was not found when vlfast was installed")
    assert "VLFAST_BUILD_CUDA=1" in _not_built_reason(str(tmp_path / "missing.json"))


def _setup_py(tmp_path, **env):
    """setup.py's build_ext in a copy of the package, where nvcc cannot be found."""
    for name in ("setup.py", "pyproject.toml", "CMakeLists.txt", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "vlfast", tmp_path / "vlfast", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    run_env = {**os.environ, "CUDACXX": str(tmp_path / "no-nvcc"), **env}
    return subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp_path,
                          env=run_env, capture_output=True, text=True, timeout=300)


def test_setup_without_nvcc_installs_pure_python_and_records_why(tmp_path):
    out = _setup_py(tmp_path, VLFAST_BUILD_CUDA="auto")
    assert out.returncode == 0, out.stderr
    assert "WARNING: not building the CUDA extension vlfast._C: nvcc was not found" in out.stderr
    status = json.loads((tmp_path / "vlfast" / "_build_cuda.json").read_text())
    assert status["built"] is False and "nvcc was not found" in status["reason"]
    assert not list((tmp_path / "vlfast").glob("_C*.so"))


def test_setup_with_build_forced_fails_without_nvcc(tmp_path):
    out = _setup_py(tmp_path, VLFAST_BUILD_CUDA="1")
    assert out.returncode != 0
    assert "VLFAST_BUILD_CUDA=1: cannot build vlfast._C: nvcc was not found" in out.stderr


def test_setup_rejects_an_unknown_mode(tmp_path):
    out = _setup_py(tmp_path, VLFAST_BUILD_CUDA="yes")
    assert out.returncode != 0 and "VLFAST_BUILD_CUDA must be 0, 1 or auto, got 'yes'" in out.stderr


@pytest.mark.skipif(shutil.which("cmake") is None or not _nvcc_present(), reason="needs cmake and nvcc")
def test_cmake_configures_standalone(tmp_path):
    """`cmake -B build -G Ninja` works without setup.py (configure only: the build is CI's install)."""
    pytest.importorskip("pybind11", reason="CMakeLists.txt finds pybind11's CMake files through the package")
    args = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), f"-DVLFAST_OUTPUT_DIR={tmp_path}",
            f"-DPython_EXECUTABLE={sys.executable}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if not shutil.which("nvcc"):
        args.append("-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc")
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    if not os.environ.get("VLFAST_CUDA_ARCHS"):  # the default targets, sm_90a's arch-specific code included
        rules = (tmp_path / "build.ninja").read_text() if (tmp_path / "build.ninja").is_file() else ""
        assert not rules or ("compute_80" in rules and "compute_90a" in rules)
