"""Inputs, the exactness check and the GPU checks every GPU impl runs, for the codebook-lookup tests.

Indices are judged by float64_argmin, plain float64 PyTorch that shares no code with vlfast (not its
certifier, not reference.spec_lookup); distances by the definition (reference.spec_distances via spec_lookup).
"""
from __future__ import annotations

import importlib

import torch

import vlfast
from vlfast.ops.codebook_lookup.reference import spec_lookup

GAPS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7)
# (N, K, D, dtype) of the GPU parity tests, every GPU impl alike.
GPU_SHAPES = [(65536, 8192, 256, torch.bfloat16), (4097, 1000, 48, torch.bfloat16), (1, 8193, 8, torch.bfloat16),
              (65537, 1, 3, torch.bfloat16), (20000, 16384, 64, torch.bfloat16), (3000, 512, 100, torch.bfloat16),
              (1024, 300, 512, torch.bfloat16), (4097, 1000, 64, torch.float16), (8192, 4096, 256, torch.float32),
              (4097, 1000, 48, torch.float32)]


def random_case(n: int, k: int, d: int, dtype: torch.dtype, device="cpu", offset: float = 0.0):
    """z (n, d) and codebook (k, d): Gaussian, plus a common offset (cancellation when large)."""
    z = torch.randn(n, d, dtype=torch.float64) + offset
    e = torch.randn(k, d, dtype=torch.float64) + offset
    return z.to(device, dtype), e.to(device, dtype)


def planted_near_ties(k: int, d: int, dtype: torch.dtype, rows_per_gap: int = 8, device="cpu"):
    """z and a codebook in which each row's two nearest codes a, b differ by a relative gap from GAPS.

    Code b is code a with one coordinate moved by t, which changes the distance from z by
    t^2 - 2 t (z_k - a_k); t is chosen for the planted gap and rounded to the dtype, so the gaps that
    come out are near the planted ones (down to the dtype's resolution). Returns z, e and the planted
    gap of every row.
    """
    e = torch.randn(k, d, dtype=torch.float64).to(dtype).double()
    rows, gaps = [], []
    n_pairs = len(GAPS) * rows_per_gap
    pair_codes = torch.randperm(k)[: 2 * n_pairs].view(n_pairs, 2)
    for p, (ia, ib) in enumerate(pair_codes.tolist()):
        gap = GAPS[p // rows_per_gap]
        a = e[ia]
        z = (a + 0.05 * torch.randn(d, dtype=torch.float64)).to(dtype).double()
        dist = ((z - a) ** 2).sum()
        kk = int(torch.randint(d, ()))
        lever = float(z[kk] - a[kk])
        if lever == 0.0:
            lever = 1.0
        t = -gap * float(dist) / (2 * lever) * (1 if p % 2 else -1)  # either code may be the nearer
        b = a.clone()
        b[kk] = a[kk] + t
        e[ib] = b.to(dtype).double()
        rows.append(z)
        gaps.append(gap)
    return torch.stack(rows).to(device, dtype), e.to(device, dtype), torch.tensor(gaps)


def realised_gaps(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """(second - best) / best of the float64 distances, per row."""
    dist = torch.cdist(z.double(), e.double()) ** 2
    two = dist.topk(2, dim=1, largest=False).values
    return (two[:, 1] - two[:, 0]) / two[:, 0].clamp(min=1e-300)


# Elements of one (rows, K, D) block of float64_argmin's cosine products. Not a GEMM: a float64 GEMM's
# edge kernels may round the last columns' sums differently from the others (seen on a Zen 5 CPU with
# MKL), so that equal codes score unequally; a sum per pair does every pair the same way.
COSINE_BLOCK_ELEMENTS = 1 << 22


def float64_argmin(z: torch.Tensor, e: torch.Tensor, metric: str, rows: int = 1024) -> torch.Tensor:
    """The nearest code per row (N,) int64 in float64, independent of vlfast: l2 by torch.cdist without the
    matrix-product shortcut (differences, no cancellation), cosine by the largest float64 similarity to the
    normalised codes (a zero code scores 0), each summed on its own; ties go to the lowest index, stated
    explicitly (not left to argmin)."""
    z64, e64 = z.double(), e.double()
    if metric == "cosine":
        norm = e64.norm(dim=1, keepdim=True)
        e64 = torch.where(norm > 0, e64 / torch.where(norm > 0, norm, 1.0), 0.0)
    codes = torch.arange(e.shape[0], device=z.device)
    if metric == "cosine":  # products summed per pair, as many pairs as COSINE_BLOCK_ELEMENTS allows
        rows = max(1, min(rows, COSINE_BLOCK_ELEMENTS // max(1, e64.numel())))
    out = []
    for r0 in range(0, z64.shape[0], rows):
        block = z64[r0:r0 + rows]
        if metric == "l2":
            value = torch.cdist(block, e64, compute_mode="donot_use_mm_for_euclid_dist")
        else:
            value = -(block[:, None, :] * e64).sum(dim=2)
        best = value.min(dim=1, keepdim=True).values
        out.append(torch.where(value == best, codes, e.shape[0]).min(dim=1).values)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64, device=z.device)


def assert_exact(z: torch.Tensor, e: torch.Tensor, metric: str, index: torch.Tensor, dist: torch.Tensor,
                 context: str = "") -> None:
    """indices equal the oracle's; distances are its float64 values rounded to float32 (1 ulp)."""
    d = z.shape[-1]
    want_index = float64_argmin(z.reshape(-1, d), e, metric).cpu()
    want_dist = spec_lookup(z.reshape(-1, d), e, metric)[1].cpu()  # the definition's distance to that code
    got_index = index.reshape(-1).cpu()
    wrong = (got_index != want_index).nonzero().squeeze(1)
    assert wrong.numel() == 0, (f"{context}: {wrong.numel()} of {got_index.numel()} indices differ from the "
                                f"float64 argmin, first rows {wrong[:5].tolist()}: got "
                                f"{got_index[wrong[:5]].tolist()}, want {want_index[wrong[:5]].tolist()}")
    assert index.dtype == torch.int64 and dist.dtype == torch.float32
    assert index.shape == dist.shape == z.shape[:-1]
    torch.testing.assert_close(dist.reshape(-1).cpu().double(), want_dist, rtol=2.5e-7, atol=1e-30,
                               msg=lambda m: f"{context} distances: {m}")


def check_exact_on_gpu(z: torch.Tensor, e: torch.Tensor, metric: str, impl: str, context: str = "") -> torch.Tensor:
    """vlfast's indices for every row against float64_argmin (on the GPU; shares nothing with the certifier),
    and 65 random rows, distances too, against the definition; returns the indices."""
    index, dist = vlfast.codebook_lookup(z, e, metric=metric, impl=impl)
    want = float64_argmin(z, e, metric)
    wrong = (index != want).nonzero().squeeze(1)
    assert wrong.numel() == 0, f"{impl} {context}: {wrong.numel()} rows differ, first {wrong[:5].tolist()}"
    rows = torch.randperm(z.shape[0], device=z.device)[:65]
    assert_exact(z[rows], e, metric, index[rows], dist[rows], f"{impl} {context}")
    return index


def last_call(impl: str) -> dict:
    """The impl module's record of its last call: rows, and rows re-scored in float64."""
    return importlib.import_module(f"vlfast.ops.codebook_lookup.{impl}").last_call


def check_planted_near_ties_on_gpu(impl: str, dtype: torch.dtype, d: int) -> None:
    """Gaps 1e-2 .. 1e-7 between the two nearest codes: the certification's model of tensor-core
    rounding (certify.dot_error) must hold for the impl's scan, or some of these rows come out wrong."""
    z, e, _ = planted_near_ties(8192, d, dtype, rows_per_gap=200, device="cuda")
    check_exact_on_gpu(z, e, "l2", impl, f"near-ties {dtype} D={d}")
    assert last_call(impl)["rescored"] > 0


def check_ties_offsets_and_magnitudes_on_gpu(impl: str, dtype: torch.dtype) -> None:
    """Duplicate codes (lowest index), an all-equal stride-0 codebook, cancellation, fp32 overflow and underflow."""
    z, e = random_case(5000, 3000, 64, dtype, device="cuda")
    e[[100, 1700, 2999]] = e[2000].clone()
    z[:100] = e[2000]
    assert (check_exact_on_gpu(z, e, "l2", impl, "duplicates")[:100] == 100).all()
    e_equal = e[:1].expand(513, 64)
    assert (check_exact_on_gpu(z, e_equal, "l2", impl, "all equal") == 0).all()
    check_exact_on_gpu(*random_case(5000, 3000, 64, dtype, device="cuda", offset=300.0), "l2", impl, "offset")
    if dtype == torch.float32:
        check_exact_on_gpu(z * 1e20, e * 1e20, "l2", impl, "huge")
        check_exact_on_gpu(z * 1e-41, e * 1e-41, "l2", impl, "subnormal")


def check_random_data_rarely_needs_float64(impl: str) -> None:
    """The fraction of rows the filter cannot certify: the float64 re-scoring's share of the work."""
    z, e = random_case(65536, 8192, 256, torch.bfloat16, device="cuda")
    vlfast.codebook_lookup(z, e, impl=impl)
    fraction = last_call(impl)["rescored"] / z.shape[0]
    print(f"{impl}: re-scored {fraction:.4f} of rows")
    assert fraction < 0.03


def check_extra_memory_does_not_grow_with_n_times_k(impl: str, n: int, k: int, d: int, dtype: torch.dtype,
                                                    allowed: float = 0.0) -> None:
    """Peak extra memory O(N + K), never N x K; `allowed` extra bytes on top of the common budget."""
    z, e = random_case(n, k, d, dtype, device="cuda")
    vlfast.codebook_lookup(z, e, impl=impl)  # warm-up: compiles, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    vlfast.codebook_lookup(z, e, impl=impl)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 160e6 + 64 * n + allowed, (f"{impl}: extra memory {extra / 1e6:.1f} MB "
                                               f"(N x K fp32 would be {n * k * 4 / 1e9:.1f} GB)")


def check_compile_fullgraph_on_gpu(impl: str) -> None:
    torch._dynamo.reset()

    def step(z, e):
        index, dist = vlfast.codebook_lookup(z, e, impl=impl)
        return e[index], dist

    z, e = random_case(3000, 512, 64, torch.bfloat16, device="cuda")
    got = torch.compile(step, fullgraph=True)(z, e)
    want = step(z, e)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def check_vector_quantizer_matches_reference(impl: str) -> None:
    """Three EMA training steps of nn.VectorQuantizer: the same indices and codebook as impl="reference".

    The codebook's sums are index_add_, whose CUDA atomics add in any order unless PyTorch's
    deterministic mode is on (measured on an H100: the codebooks then differ in the last bits).
    """
    from vlfast.nn import VectorQuantizer
    modules = {}
    for name in ("reference", impl):
        torch.manual_seed(0)
        modules[name] = VectorQuantizer(512, 64, ema_decay=0.9, dead_code_threshold=0.5, impl=name).cuda().train()
    was, was_warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for batch in [torch.randn(8, 64, 16, 16, device="cuda") for _ in range(3)]:
            outs = {}
            for name, vq in modules.items():
                torch.manual_seed(1)  # the same dead-code draws
                outs[name] = vq(batch)
            assert torch.equal(outs["reference"].indices, outs[impl].indices)
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)
    assert torch.equal(modules["reference"].codebook, modules[impl].codebook)
