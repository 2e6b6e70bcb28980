"""The CUDA C++ codebook kernels (impl="cuda") on a GPU: the Triton path's parity checks
(codebook_lookup_cases.py, same shapes and cases), both scans against float64 scores, streams, the
extension's own checks. Run by benchmarks/gpu_check.sh after it builds vlfast._C; skipped without CUDA.
"""
import pytest
import torch

import vlfast
from vlfast._backends import extension

from . import codebook_lookup_cases as cases

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(extension()[0] is None, reason=f"vlfast._C is not built: {extension()[1]}")]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d,dtype", cases.GPU_SHAPES, ids=lambda x: str(x))
def test_cuda_is_the_float64_argmin_on_gpu(n, k, d, dtype, metric, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")  # scan results start as NaN: unwritten rows would be re-scored
    z, e = cases.random_case(n, k, d, dtype, device="cuda")
    cases.check_exact_on_gpu(z, e, metric, "cuda", f"{n}x{k}x{d} {dtype} {metric}")
    # A few percent of random rows are near-ties (more for float32: bf16x3 sums 3D terms); rows the
    # scan failed to write would all be re-scored.
    assert cases.last_call("cuda")["rescored"] <= max(2, n // 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [48, 256])
def test_planted_near_ties_on_tensor_cores(dtype, d):
    cases.check_planted_near_ties_on_gpu("cuda", dtype, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ties_offsets_and_magnitudes_on_gpu(dtype):
    cases.check_ties_offsets_and_magnitudes_on_gpu("cuda", dtype)


def test_random_data_rarely_needs_float64():
    cases.check_random_data_rarely_needs_float64("cuda")


@pytest.mark.parametrize("n,k,d,dtype", [(65536, 8192, 256, torch.bfloat16), (262144, 16384, 64, torch.bfloat16),
                                         (65536, 8192, 256, torch.float32)], ids=str)
def test_extra_memory_does_not_grow_with_n_times_k(n, k, d, dtype):
    pieces = (n + k) * 3 * d * 2 if dtype == torch.float32 else 0  # float32: the bf16x3 pieces
    cases.check_extra_memory_does_not_grow_with_n_times_k("cuda", n, k, d, dtype, allowed=pieces)


def test_compile_fullgraph_on_gpu():
    cases.check_compile_fullgraph_on_gpu("cuda")


def test_vector_quantizer_training_matches_reference_impl():
    cases.check_vector_quantizer_matches_reference("cuda")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_scans_agree_with_float64_scores(dtype):
    """The CUDA and Triton scans: best and second within the certified error of the float64 scores,
    the argmin wherever the gap exceeds it, ties to the lowest index with second == best."""
    from vlfast.ops.codebook_lookup import certify, cuda, triton
    z, e = cases.random_case(3000, 2000, 72, dtype, device="cuda")
    e[[3, 700, 1999]] = e[1234].clone()
    z[:50] = e[1234]
    z, e = cuda.kernel_rows(z), cuda.kernel_rows(e)
    terms = certify.codebook_terms(e, "l2")
    eps = certify.score_error(torch.linalg.vector_norm(z, dim=1, dtype=torch.float64), terms, 72,
                              certify.dot_error(dtype, 72), "l2", certify.products(dtype))
    want = (terms["alpha"].double() * (z.double() @ e.double().T) + terms["beta"].double()).topk(2, largest=False)
    clear = want.values[:, 1] - want.values[:, 0] > 2 * eps
    assert clear.float().mean() > 0.9
    for scan in (cuda.scan, triton.scan):
        best, second, index = scan(z, e, terms["alpha"], terms["beta"])
        assert ((best.double() - want.values[:, 0]).abs() <= eps).all()
        assert ((second.double() - want.values[:, 1]).abs() <= eps).all()
        assert torch.equal(index.long()[clear], want.indices[clear, 0])
        assert (index[:50] == 3).all() and torch.equal(second[:50], best[:50])


def test_deterministic_and_on_the_current_stream():
    z, e = cases.random_case(20000, 4096, 64, torch.bfloat16, device="cuda")
    want = vlfast.codebook_lookup(z, e, impl="cuda")
    assert all(torch.equal(a, b) for a, b in zip(want, vlfast.codebook_lookup(z, e, impl="cuda")))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = vlfast.codebook_lookup(z, e, impl="cuda")
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_host_memory_is_refused_by_the_extension():
    ext = extension()[0]
    z = torch.randn(8, 64, dtype=torch.bfloat16)  # on the CPU
    e = torch.randn(8, 64, dtype=torch.bfloat16, device="cuda")
    f = torch.ones(8, device="cuda")
    index = torch.empty(8, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="argument 'z' is not device memory"):
        ext.codebook_lookup_scan(z=z.data_ptr(), e=e.data_ptr(), alpha=f.data_ptr(), beta=f.data_ptr(),
                                 best=f.data_ptr(), second=f.data_ptr(), index=index.data_ptr(), work=0,
                                 work_size=0, n=8, k=8, d=64, stride_z=64, stride_e=64, codes_per_split=128, splits=1,
                                 dtype=ext.DTYPE_CODES["bfloat16"], device=0,
                                 stream=torch.cuda.current_stream().cuda_stream)
