"""The codebook-lookup kernels on a GPU at real sizes (run by benchmarks/gpu_check.sh; skipped without
CUDA): exact indices against float64, the tensor-core error model on planted near-ties, memory.
The checks live in codebook_lookup_cases.py; test_codebook_lookup_cuda_gpu.py runs them on impl="cuda"."""
import pytest
import torch

import vlfast

from . import codebook_lookup_cases as cases

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d,dtype", cases.GPU_SHAPES, ids=lambda x: str(x))
def test_triton_is_the_float64_argmin_on_gpu(n, k, d, dtype, metric, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    z, e = cases.random_case(n, k, d, dtype, device="cuda")
    cases.check_exact_on_gpu(z, e, metric, "triton", f"{n}x{k}x{d} {dtype} {metric}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [48, 256])
def test_planted_near_ties_on_tensor_cores(dtype, d):
    cases.check_planted_near_ties_on_gpu("triton", dtype, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ties_offsets_and_magnitudes_on_gpu(dtype):
    cases.check_ties_offsets_and_magnitudes_on_gpu("triton", dtype)


def test_random_data_rarely_needs_float64():
    cases.check_random_data_rarely_needs_float64("triton")


@pytest.mark.parametrize("n,k,d", [(65536, 8192, 256), (262144, 16384, 64)])
def test_extra_memory_does_not_grow_with_n_times_k(n, k, d):
    cases.check_extra_memory_does_not_grow_with_n_times_k("triton", n, k, d, torch.bfloat16)


def test_deterministic_and_auto_picks_cuda_where_built(monkeypatch):
    """auto: the CUDA extension where it is built (measured faster on an H100), else Triton."""
    from vlfast.ops import codebook_lookup as op
    from vlfast.ops.codebook_lookup import cuda
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    want = "cuda" if cuda.why_not(torch.device("cuda"), torch.bfloat16) is None else "triton"
    seen = []
    for impl in ("triton", "cuda"):
        real = op._FORWARD[impl]
        monkeypatch.setitem(op._FORWARD, impl, lambda *a, impl=impl, real=real: seen.append(impl) or real(*a))
    z, e = cases.random_case(10000, 2048, 64, torch.bfloat16, device="cuda")
    first = vlfast.codebook_lookup(z, e)
    second = vlfast.codebook_lookup(z, e)
    assert seen == [want, want] and torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_compile_fullgraph_on_gpu():
    cases.check_compile_fullgraph_on_gpu("auto")


def test_vector_quantizer_training_matches_reference_impl():
    cases.check_vector_quantizer_matches_reference("triton")
