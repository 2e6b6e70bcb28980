"""Test setup: Triton runs in its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before triton is first imported, so this runs before any test module.
On a machine with a GPU the interpreter stays off (the compiled kernels run there, in the tests marked
`gpu`), and the tests that run Triton kernels on CPU tensors through the interpreter are skipped with
the command that runs them instead: one process cannot hold both kinds of @triton.jit function.
"""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    assert "triton" not in sys.modules, "triton was imported before conftest could select the interpreter"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

INTERPRETER_COMMAND = "TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES= python -m pytest -m triton"


def skip_reason(keywords, has_cuda: bool, interpreting: bool):
    """Why a test with these markers cannot run in this session, or None.

    `triton` tests run kernels in the interpreter on CPU tensors, except ahead-of-time compiles (`aot`),
    which need neither; `gpu` tests need a CUDA device.
    """
    if "gpu" in keywords:
        return None if has_cuda else "needs a CUDA device"
    if "triton" in keywords and "aot" not in keywords and not interpreting:
        return ("runs Triton kernels on CPU tensors in Triton's interpreter, which is off on a machine with "
                f"a GPU; run these with `{INTERPRETER_COMMAND}` (the gpu tests cover the compiled kernels)")
    return None


def pytest_collection_modifyitems(config, items):
    interpreting = os.environ.get("TRITON_INTERPRET", "0") == "1"
    for item in items:
        reason = skip_reason(item.keywords, HAS_CUDA, interpreting)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=("blas", "onednn"))
def fp32_gemm(request, monkeypatch):
    """Runs a test with each library under the CPU paths' float32 GEMMs (vlfast._gemm.cpu_fp32_gemm):
    the default depends on the CPU's vendor, so each is forced here. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("fp32_gemm")`."""
    from vlfast import _gemm
    if request.param == "onednn" and not _gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 inner product")
    monkeypatch.setenv("VLFAST_CPU_FP32_GEMM", request.param)
    return request.param
