"""vlfast._gemm.linear_f32 (the CPU paths' float32 GEMM): either library gives x @ w^T (+ bias) within
the float32 summation bound of the float64 product, for any strides, and the library is chosen as
documented (the CPU's vendor, VLFAST_CPU_FP32_GEMM, a clear error for a bad or unrunnable choice)."""
import pytest
import torch

from vlfast import _gemm


def _gamma(terms: int) -> float:
    u = 2.0 ** -24
    return terms * u / (1 - terms * u)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("library", _gemm.CPU_FP32_GEMMS)
def test_linear_f32_is_within_the_float32_sum_bound(library, layout, bias, monkeypatch):
    if library == "onednn" and not _gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 inner product")
    monkeypatch.setenv("VLFAST_CPU_FP32_GEMM", library)
    g = torch.Generator().manual_seed(7)
    m, n, d = 97, 65, 131
    scales = torch.logspace(-3, 3, d)[torch.randperm(d, generator=g)]
    x = torch.randn(m, d, generator=g) * scales
    w = torch.randn(n, d, generator=g) * scales.flip(0)
    if layout == "strided":  # rows of x every other row of a wider tensor, w stored transposed
        x = torch.cat([x, torch.randn(m, d, generator=g)], dim=1)[:, :d]
        w = w.T.contiguous().T
    b = torch.randn(n, generator=g) * 1e3 if bias else None
    out = torch.full((m, n), float("nan"))
    got = _gemm.linear_f32(x, w, b, out=out)
    exact = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T
    if bias:
        exact, magnitude = exact + b.double(), magnitude + b.double().abs()
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert ((got.double() - exact).abs() <= _gamma(d + bias) * magnitude).all()
    assert (got.double() != exact).any()  # rounded in float32: there is an error to bound
    if library == "blas":
        assert got.data_ptr() == out.data_ptr()


@pytest.mark.parametrize("vendor,expected", [("AuthenticAMD", "onednn"), ("GenuineIntel", "blas"), ("", "blas")])
def test_the_default_library_follows_the_cpu_vendor(vendor, expected, monkeypatch):
    monkeypatch.delenv("VLFAST_CPU_FP32_GEMM", raising=False)
    monkeypatch.setattr(_gemm, "_cpu_vendor", lambda: vendor)
    monkeypatch.setattr(_gemm, "onednn_available", lambda: True)
    _gemm._default_cpu_fp32_gemm.cache_clear()
    try:
        assert _gemm.cpu_fp32_gemm() == expected
        monkeypatch.setattr(_gemm, "onednn_available", lambda: False)
        _gemm._default_cpu_fp32_gemm.cache_clear()
        assert _gemm.cpu_fp32_gemm() == "blas"
    finally:
        _gemm._default_cpu_fp32_gemm.cache_clear()


def test_the_environment_choice_is_checked(monkeypatch):
    monkeypatch.setenv("VLFAST_CPU_FP32_GEMM", "mkl")
    with pytest.raises(ValueError, match="VLFAST_CPU_FP32_GEMM must be one of"):
        _gemm.cpu_fp32_gemm()
    monkeypatch.setenv("VLFAST_CPU_FP32_GEMM", "blas")
    assert _gemm.cpu_fp32_gemm() == "blas"
    monkeypatch.setenv("VLFAST_CPU_FP32_GEMM", "onednn")
    monkeypatch.setattr(_gemm, "onednn_available", lambda: False)
    with pytest.raises(RuntimeError, match="VLFAST_CPU_FP32_GEMM=onednn"):
        _gemm.cpu_fp32_gemm()


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = _gemm._cpu_vendor()
    try:
        with open("/proc/cpuinfo") as f:
            assert (f"vendor_id\t: {vendor}" in f.read()) or vendor == ""
    except OSError:
        assert vendor == ""


@pytest.mark.parametrize("library", _gemm.CPU_FP32_GEMMS)
def test_add_linear_f32_accumulates_in_place(library, monkeypatch):
    if library == "onednn" and not _gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 inner product")
    monkeypatch.setenv("VLFAST_CPU_FP32_GEMM", library)
    g = torch.Generator().manual_seed(3)
    acc, x, w = torch.randn(9, 5, generator=g), torch.randn(9, 70, generator=g), torch.randn(5, 70, generator=g)
    want = acc.double() + x.double() @ w.double().T
    ptr = acc.data_ptr()
    got = _gemm.add_linear_f32_(acc, x, w.T.contiguous().T)
    assert got.data_ptr() == ptr
    magnitude = acc.double().abs() + x.double().abs() @ w.double().abs().T
    assert ((got.double() - want).abs() <= _gamma(71) * magnitude).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("library", _gemm.CPU_FP32_GEMMS)
def test_mm_is_torch_mm_with_float32_through_linear_f32(library, dtype, monkeypatch):
    if library == "onednn" and not _gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN float32 inner product")
    monkeypatch.setenv("VLFAST_CPU_FP32_GEMM", library)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(13, 40, generator=g).to(dtype), torch.randn(40, 7, generator=g).to(dtype)
    out = torch.empty(13, 7, dtype=dtype)
    got = _gemm.mm(x, y, out=out)
    assert got.dtype == dtype and torch.allclose(got.double(), x.double() @ y.double(), rtol=1e-2, atol=1e-2)
    if dtype != torch.float32 or library == "blas":
        assert got.data_ptr() == out.data_ptr() and torch.equal(got, torch.mm(x, y))
