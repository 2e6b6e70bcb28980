"""The codebook-lookup kernels on a GPU at real sizes (run by benchmarks/gpu_check.sh; skipped without
CUDA): exact indices against float64, the tensor-core error model on planted near-ties, memory."""
import pytest
import torch

import vlfast
from vlfast.ops.codebook_lookup import reference as spec

from .codebook_lookup_cases import assert_exact, planted_near_ties, random_case

pytestmark = pytest.mark.gpu


def _triton():
    from vlfast.ops.codebook_lookup import triton
    return triton


def _check_exact(z, e, metric, context=""):
    """All rows against the float64 GEMM-filtered argmin on the GPU, 65 rows against the definition."""
    index, dist = vlfast.codebook_lookup(z, e, metric=metric, impl="triton")
    want = spec.exact_indices(z, e, metric)
    wrong = (index != want).nonzero().squeeze(1)
    assert wrong.numel() == 0, f"{context}: {wrong.numel()} rows differ, first {wrong[:5].tolist()}"
    rows = torch.randperm(z.shape[0], device=z.device)[:65]
    assert_exact(z[rows], e, metric, index[rows], dist[rows], context)
    return index


SHAPES = [(65536, 8192, 256, torch.bfloat16), (4097, 1000, 48, torch.bfloat16), (1, 8193, 8, torch.bfloat16),
          (65537, 1, 3, torch.bfloat16), (20000, 16384, 64, torch.bfloat16), (3000, 512, 100, torch.bfloat16),
          (1024, 300, 512, torch.bfloat16), (4097, 1000, 64, torch.float16), (8192, 4096, 256, torch.float32),
          (4097, 1000, 48, torch.float32)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("n,k,d,dtype", SHAPES, ids=lambda x: str(x))
def test_triton_is_the_float64_argmin_on_gpu(n, k, d, dtype, metric, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    _check_exact(*random_case(n, k, d, dtype, device="cuda"), metric, f"{n}x{k}x{d} {dtype} {metric}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [48, 256])
def test_planted_near_ties_on_tensor_cores(dtype, d):
    """Gaps 1e-2 .. 1e-7 between the two nearest codes: the certification's model of tensor-core
    rounding must hold, or some of these rows come out wrong."""
    z, e, _ = planted_near_ties(8192, d, dtype, rows_per_gap=200, device="cuda")
    _check_exact(z, e, "l2", f"near-ties {dtype} D={d}")
    assert _triton().last_call["rescored"] > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_ties_offsets_and_magnitudes_on_gpu(dtype):
    z, e = random_case(5000, 3000, 64, dtype, device="cuda")
    e[[100, 1700, 2999]] = e[2000].clone()
    z[:100] = e[2000]
    assert (_check_exact(z, e, "l2", "duplicates")[:100] == 100).all()
    e_equal = e[:1].expand(513, 64)
    assert (_check_exact(z, e_equal, "l2", "all equal") == 0).all()
    _check_exact(*random_case(5000, 3000, 64, dtype, device="cuda", offset=300.0), "l2", "offset")
    if dtype == torch.float32:
        _check_exact(z * 1e20, e * 1e20, "l2", "huge")


def test_random_data_rarely_needs_float64():
    """The fraction of rows the filter cannot certify: the float64 re-scoring's share of the work."""
    z, e = random_case(65536, 8192, 256, torch.bfloat16, device="cuda")
    vlfast.codebook_lookup(z, e, impl="triton")
    fraction = _triton().last_call["rescored"] / z.shape[0]
    print(f"re-scored {fraction:.4f} of rows")
    assert fraction < 0.03


@pytest.mark.parametrize("n,k,d", [(65536, 8192, 256), (262144, 16384, 64)])
def test_extra_memory_does_not_grow_with_n_times_k(n, k, d):
    z, e = random_case(n, k, d, torch.bfloat16, device="cuda")
    vlfast.codebook_lookup(z, e, impl="triton")  # warm-up: compiles, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vlfast.codebook_lookup(z, e, impl="triton")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 160e6 + 64 * n, f"extra memory {extra / 1e6:.1f} MB (N x K fp32 would be {n * k * 4 / 1e9:.1f} GB)"


def test_deterministic_and_auto_picks_triton(monkeypatch):
    from vlfast.ops import codebook_lookup as op
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    seen = []
    real = op._FORWARD["triton"]
    monkeypatch.setitem(op._FORWARD, "triton", lambda *a: seen.append(1) or real(*a))
    z, e = random_case(10000, 2048, 64, torch.bfloat16, device="cuda")
    first = vlfast.codebook_lookup(z, e)
    second = vlfast.codebook_lookup(z, e)
    assert seen and torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_compile_fullgraph_on_gpu():
    torch._dynamo.reset()

    def step(z, e):
        index, dist = vlfast.codebook_lookup(z, e)
        return e[index], dist

    z, e = random_case(3000, 512, 64, torch.bfloat16, device="cuda")
    got = torch.compile(step, fullgraph=True)(z, e)
    want = step(z, e)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_vector_quantizer_training_matches_reference_impl():
    from vlfast.nn import VectorQuantizer
    modules = {}
    for impl in ("reference", "triton"):
        torch.manual_seed(0)
        modules[impl] = VectorQuantizer(512, 64, ema_decay=0.9, dead_code_threshold=0.5, impl=impl).cuda().train()
    batches = [torch.randn(8, 64, 16, 16, device="cuda") for _ in range(3)]
    for batch in batches:
        outs = {}
        for impl, vq in modules.items():
            torch.manual_seed(1)  # the same dead-code draws
            outs[impl] = vq(batch)
        assert torch.equal(outs["reference"].indices, outs["triton"].indices)
    assert torch.equal(modules["reference"].codebook, modules["triton"].codebook)
