"""vlfast's CUDA kernels on a CPU: the csrc/ sources, compiled by g++ over an emulation of CUDA's
threads, barriers, shuffles and tensor-core instructions (tests/tools/cuda_emu), run behind
vlfast.clip_loss(impl="cuda") and compared with float64 on every layout and dtype, with several tiles,
column splits and row chunks, rows off 16-byte boundaries and near-perfect pairs.

This checks the kernels' indexing, masking and math, their host-side checks and the Python glue,
where CI has no GPU. Real asynchrony, races and speed are tested on a GPU (test_clip_loss_cuda_gpu.py,
and compute-sanitizer in benchmarks/gpu_check.sh).
"""
import importlib.util
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from .ops.clip_loss_cases import (Case, assert_close64, assert_relative_rule, make_inputs, pytorch_same_dtype,
                                  reference64, run_vlfast)

LAYOUTS = [("softmax", True, 0, 0), ("softmax", False, 5, 11), ("sigmoid", True, 0, 0), ("sigmoid", True, 3, 8),
           ("sigmoid", True, None, 6)]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if shutil.which("g++") is None or not Path("/usr/local/cuda/include/nvtx3").is_dir():
        pytest.skip("needs g++ and CUDA's headers (NVTX3)")
    pytest.importorskip("pybind11")
    from .tools.cuda_emu.build import build
    path = build(tmp_path_factory.mktemp("cuda_emu"))
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _OnCpu:
    """The emulated module, called as cuda.py calls vlfast._C (CPU tensors have no device index)."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            if kwargs.get("device", 0) is None:
                kwargs["device"] = 0
            return attr(*args, **kwargs)
        return call


@pytest.fixture
def on_cpu(emulated, monkeypatch):
    """impl="cuda" runs the emulated kernels on CPU tensors."""
    from vlfast.ops.clip_loss import cuda
    monkeypatch.setattr(cuda, "why_not", lambda device, dtype: None)
    monkeypatch.setattr(cuda, "_extension", lambda a: _OnCpu(emulated))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    monkeypatch.setenv("VLFAST_POISON", "1")  # scratch starts as NaN: unwritten elements would show


def _check(case, img=None, txt=None, view=None):
    a, b, s, bias, grad = make_inputs(case, img, txt)
    if view is not None:
        a = view(a)
    ref = reference64(case, a, b, s, bias, grad)
    got = run_vlfast(case, "cuda", a, b, s, bias, grad)
    assert_relative_rule(got, ref, pytorch_same_dtype(case, a, b, s, bias, grad), ATOL[case.dtype], f"{case}")


def _case(n, d, dtype, layout, **kw):
    kind, symmetric, offset, extra = layout
    return Case(n=n, m=n + extra, d=d, dtype=dtype, kind=kind, symmetric=symmetric, offset=offset,
                bias=-2.0 if kind == "sigmoid" else 0.5, **kw)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: f"{l[0]}-sym{l[1]}-off{l[2]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,d", [(1, 8), (7, 100), (130, 40)])
def test_emulated_kernels_match_float64(on_cpu, n, d, dtype, layout):
    _check(_case(n, d, dtype, layout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_column_splits_and_row_chunks(on_cpu, dtype, monkeypatch):
    from vlfast.ops.clip_loss import partials
    monkeypatch.setattr(partials, "GRAD_CHUNK_BYTES", 128 * 300 * 4)  # chunks of 128 rows
    monkeypatch.setattr(partials, "column_splits",  # one column tile per split
                        lambda row_blocks, m, device, step: (-(-m // step), step))
    for layout in (LAYOUTS[0], LAYOUTS[1], LAYOUTS[3]):
        _check(_case(270, 24, dtype, layout))


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 100), (torch.float32, 101)], ids=str)
def test_rows_off_16_byte_boundaries(on_cpu, dtype, d):
    def mid_row_view(a):  # same values, data_ptr not 16-byte aligned
        view = torch.cat([torch.zeros(1, d, dtype=dtype), a])[1:]
        assert view.data_ptr() % 16
        return view
    _check(Case(n=40, m=40, d=d, dtype=dtype), view=mid_row_view)


def test_near_perfect_pairs(on_cpu):
    from .ops.test_clip_loss import _margin_form_softmax64
    n, d = 64, 48
    shared = F.normalize(torch.randn(1, d, dtype=torch.float64), dim=-1) * 1.5
    img = F.normalize(shared + F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1), dim=-1)
    case = Case(n=n, m=n, d=d, dtype=torch.float32, scale=100.0)
    a, b, s, bias, grad = make_inputs(case, img, img.clone())
    ref = _margin_form_softmax64(a, b, s, grad)
    assert 1e-13 < float(ref["loss"].min()) < 1e-9
    assert_close64(run_vlfast(case, "cuda", a, b, s, bias, grad), ref, 1e-3, "near-perfect")


def test_emulated_module_checks_arguments_as_the_real_one(emulated):
    with pytest.raises(ValueError, match="argument 'a' is a null pointer"):
        emulated.clip_loss_positive(a=0, b=16, scale=16, bias=0, out=16, n=1, m=1, d=8, offset=0, stride_a=8,
                                    stride_b=8, dtype=2, device=0, stream=0)
