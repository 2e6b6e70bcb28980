"""vlfast's CUDA kernels on a CPU: the csrc/ sources, compiled by g++ over an emulation of CUDA's
threads, barriers, shuffles and tensor-core instructions (tests/tools/cuda_emu), run behind
vlfast.clip_loss(impl="cuda") and compared with float64 on every layout and dtype, with several tiles,
column splits and row chunks, rows off 16-byte boundaries and near-perfect pairs; and behind
vlfast.codebook_lookup(impl="cuda") against the float64 argmin, with near-ties, duplicate codes,
several row blocks and codebook splits, both metrics and every dtype; and behind
vlfast.attention_decode(impl="cuda") against a float64 oracle on contiguous, transposed and paged
caches, GQA groups, every mask kind, dtypes, head dims and split counts; and similarity_topk's candidate
filter (cuda.emit) against thresholded float64 scores, within the codebook scan's certified error, with
overflowing rows, several row blocks and key splits, every dtype; and the candidates' float64 scores
(cuda.pair_scores) against the definition, bit for bit.

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

import vlfast

from .ops.clip_loss_cases import (Case, assert_close64, assert_relative_rule, make_inputs, pytorch_same_dtype,
                                  reference64, run_vlfast)
from .ops.codebook_lookup_cases import assert_exact, planted_near_ties, random_case

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


# --- codebook_lookup ------------------------------------------------------------------------------------
# Shapes are small: an emulated block costs ~0.1 s (its 256 threads meet at a barrier per mma).

@pytest.fixture
def codebook_on_cpu(emulated, monkeypatch):
    """impl="cuda" of codebook_lookup runs the emulated kernels on CPU tensors."""
    from vlfast.ops.codebook_lookup import cuda
    monkeypatch.setattr(cuda, "why_not", lambda device, dtype: None)
    monkeypatch.setattr(cuda, "_extension", lambda z: _OnCpu(emulated))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    monkeypatch.setenv("VLFAST_POISON", "1")  # scan results start as NaN: unwritten rows would be re-scored
    return cuda


def _lookup(cuda, z, e, metric, context):
    index, dist = vlfast.codebook_lookup(z, e, metric=metric, impl="cuda")
    assert_exact(z, e, metric, index, dist, f"emulated cuda {context}")
    return index, cuda.last_call["rescored"]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_emulated_codebook_lookup_is_the_float64_argmin(codebook_on_cpu, dtype, metric):
    """Two codebook splits, a ragged last code tile, D not a multiple of the 32-wide k step."""
    z, e = random_case(97, 200, 40, dtype)
    _, rescored = _lookup(codebook_on_cpu, z, e, metric, f"97x200x40 {dtype} {metric}")
    assert rescored <= 4  # the scan decides almost every row itself (NaN from unwritten rows would not)


@pytest.mark.parametrize("n,k,d,dtype,metric", [(1, 1, 3, torch.bfloat16, "l2"), (1, 1, 3, torch.float32, "cosine"),
                                                (130, 300, 48, torch.bfloat16, "l2"),
                                                (5, 33, 100, torch.float32, "cosine"),
                                                (3, 129, 8, torch.float16, "l2")], ids=str)
def test_emulated_codebook_lookup_odd_shapes(codebook_on_cpu, n, k, d, dtype, metric):
    """One row and code; two row blocks x three splits; bf16x3 over 3 x 100 features; one code past a tile."""
    _lookup(codebook_on_cpu, *random_case(n, k, d, dtype), metric, f"{n}x{k}x{d} {dtype} {metric}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_emulated_codebook_lookup_planted_near_ties(codebook_on_cpu, dtype):
    z, e, _ = planted_near_ties(200, 48, dtype)
    _, rescored = _lookup(codebook_on_cpu, z, e, "l2", f"near-ties {dtype}")
    assert rescored > 0  # the bound sends the closest ties to float64


@pytest.mark.parametrize("one_split", [False, True], ids=["3-splits", "1-split"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_codebook_lookup_duplicate_codes(codebook_on_cpu, dtype, metric, one_split, monkeypatch):
    """Equal codes in one thread (8, 9; 136 too with one split), other lanes and warps (40, 123),
    other code tiles and splits (136, 299): the lowest index wins."""
    if one_split:
        from vlfast.ops.codebook_lookup import splits
        monkeypatch.setattr(splits, "plan", lambda row_blocks, k, device, step: (1, -(-k // step) * step))
    z, e = random_case(40, 300, 16, dtype)
    e[[8, 9, 40, 136, 299]] = e[123].clone()
    if metric == "cosine":
        e[200] = 2 * e[123]
    z[:20] = (e[123].double() + 0.01 * torch.randn(20, 16, dtype=torch.float64)).to(dtype)
    index, _ = _lookup(codebook_on_cpu, z, e, metric, f"duplicates {dtype} {metric}")
    assert (index[:20] == 8).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_scan_gives_best_index_and_second(codebook_on_cpu, dtype):
    """The scan's own outputs against float64 scores: best and second within the certified error,
    ties to the lowest index with second == best, index right wherever the gap exceeds the error."""
    from vlfast.ops.codebook_lookup import certify
    cuda = codebook_on_cpu
    z, e = random_case(70, 300, 24, dtype)
    e[[5, 13, 130, 299]] = e[77].clone()  # 5 and 13 in one thread, the others elsewhere
    z[:10] = e[77]
    z, e = cuda.kernel_rows(z), cuda.kernel_rows(e)
    terms = certify.codebook_terms(e, "l2")
    best, second, index = cuda.scan(z, e, terms["alpha"], terms["beta"])
    scores = terms["alpha"].double() * (z.double() @ e.double().T) + terms["beta"].double()
    want = scores.topk(2, dim=1, largest=False)
    eps = certify.score_error(torch.linalg.vector_norm(z.double(), dim=1), terms, 24,
                              certify.dot_error(dtype, 24), "l2", certify.products(dtype))
    assert torch.isfinite(best).all() and torch.isfinite(second).all()
    assert ((best.double() - want.values[:, 0]).abs() <= eps).all()
    assert ((second.double() - want.values[:, 1]).abs() <= eps).all()
    clear = want.values[:, 1] - want.values[:, 0] > 2 * eps
    assert clear.sum() > 50 and torch.equal(index.long()[clear], want.indices[clear, 0])
    assert (index[:10] == 5).all() and torch.equal(second[:10], best[:10])


def test_emulated_codebook_lookup_copies_rows_off_16_byte_boundaries(codebook_on_cpu):
    z, e = random_case(20, 50, 100, torch.bfloat16)
    view = torch.cat([torch.zeros(1, 100, dtype=torch.bfloat16), z])[1:]  # data_ptr 200 bytes in
    assert view.data_ptr() % 16
    _lookup(codebook_on_cpu, view, e, "l2", "mid-row view")
    _lookup(codebook_on_cpu, z[:, :50], e[:, :50], "cosine", "strided rows")
    _lookup(codebook_on_cpu, z, e[:1].expand(50, 100), "l2", "expanded codebook")


def test_emulated_codebook_module_checks_arguments_as_the_real_one(emulated):
    args = dict(z=16, e=16, alpha=16, beta=16, best=16, second=16, index=16, work=0, work_size=0, n=1, k=1, d=8,
                stride_z=8, stride_e=8, codes_per_split=128, splits=1, dtype=2, device=0, stream=0)
    with pytest.raises(ValueError, match="argument 'beta' is a null pointer"):
        emulated.codebook_lookup_scan(**{**args, "beta": 0})
    with pytest.raises(ValueError, match="argument 'work' is a null pointer"):
        emulated.codebook_lookup_scan(**{**args, "dtype": 0})


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_emulated_codebook_lookup_opcheck(codebook_on_cpu, metric):
    """The torch.library boundary with impl="cuda": schema, fake tensor, no hidden state."""
    from vlfast.ops.codebook_lookup import codebook_lookup_forward
    z, e = random_case(13, 37, 20, torch.float32)
    torch.library.opcheck(codebook_lookup_forward, (z, e, metric, "cuda"))


# --- attention_decode -----------------------------------------------------------------------------------
# Against tests/ops/test_attention_decode.py's float64 oracle, on its cases (poisoned slots past each
# row's length, shuffled pages with poisoned spare pages).

@pytest.fixture
def decode_on_cpu(emulated, monkeypatch):
    """impl="cuda" of attention_decode runs the emulated kernels on CPU tensors."""
    from vlfast.ops.attention_decode import cuda
    monkeypatch.setattr(cuda, "why_not", lambda device, dtype: None)
    monkeypatch.setattr(cuda, "_extension", lambda q: _OnCpu(emulated))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    return cuda


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "paged-1", "paged-16"])
def test_emulated_decode_layouts_and_lengths(decode_on_cpu, layout):
    """Lengths 0, 1, odd and full, different per row; S_max not a multiple of the 32-key block."""
    from .ops.test_attention_decode import _case, _run_and_check
    q, k, v, lengths, g = _case(4, 4, 2, 1, 32, 67, [0, 1, 37, 67])
    _run_and_check("cuda", q, k, v, lengths, g, layout)


@pytest.mark.parametrize("hq,hkv,sq", [(3, 3, 1), (4, 2, 5), (8, 1, 1), (7, 1, 16), (8, 1, 16)])
def test_emulated_decode_gqa_groups_and_query_counts(decode_on_cpu, hq, hkv, sq):
    """Groups of 1 to 128 query rows per kv head: 7 x 16 and 8 x 16 take several 16-row chunks."""
    from vlfast import masks
    from .ops.test_attention_decode import _case, _run_and_check
    q, k, v, lengths, g = _case(2, hq, hkv, sq, 16, 45, [16, 45], seed=hq * 100 + sq)
    _run_and_check("cuda", q, k, v, lengths, g, "paged-16", masks.causal())


@pytest.mark.parametrize("kind", ["none", "causal", "window", "spans", "spans-per-row", "dalle-row", "dalle-column",
                                  "dalle-conv", "padding", "causal+padding"])
def test_emulated_decode_every_mask_kind(decode_on_cpu, kind):
    """Sq = 3 queries at each row's end; the 2-token row puts its first query before position 0."""
    from .ops.test_attention_decode import _case, _masks, _run_and_check
    q, k, v, lengths, g = _case(2, 2, 1, 3, 16, 34, [34, 2], seed=11)
    _run_and_check("cuda", q, k, v, lengths, g, "paged-16", _masks(34, 2)[kind])


@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 64), (torch.float16, 80), (torch.float32, 80),
                                     (torch.bfloat16, 256), (torch.float32, 7)], ids=str)
def test_emulated_decode_dtypes_and_head_dims(decode_on_cpu, dtype, d):
    """Each dims-per-lane variant (d <= 64, <= 128, <= 256) and 16-bit caches; d = 7 and 80 leave lanes idle."""
    from vlfast import masks
    from .ops.test_attention_decode import _case, _run_and_check
    q, k, v, lengths, g = _case(3, 4, 2, 2, d, 40, [40, 13, 1], dtype=dtype, seed=d)
    _run_and_check("cuda", q, k, v, lengths, g, "transposed" if d == 80 else "paged-16", masks.causal())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_emulated_decode_caches_off_16_byte_pieces(decode_on_cpu, dtype):
    """Caches whose rows do not start on 16-byte boundaries (a view one element in, rows of 65 elements
    holding 64) are read element by element, with the same results."""
    from vlfast import masks
    from .ops.test_attention_decode import _case, _oracle, _check
    q, k, v, lengths, g = _case(2, 4, 2, 2, 64, 37, [37, 20], dtype=dtype, seed=21)

    def one_element_in(x):
        flat = torch.empty(x.numel() + 1, dtype=dtype)
        view = flat[1:].view(x.shape)
        view.copy_(x)
        assert view.data_ptr() % 16
        return view

    def padded_rows(x):
        wide = torch.zeros(*x.shape[:3], 65, dtype=dtype)
        wide[..., :64] = x
        return wide[..., :64]

    keys = [k[row, :, :n] for row, n in enumerate(lengths.tolist())]
    values = [v[row, :, :n] for row, n in enumerate(lengths.tolist())]
    want, _ = _oracle(q, keys, values, lengths.tolist(), masks.causal())
    for view in (one_element_in, padded_rows):
        with torch.no_grad():
            out = vlfast.attention_decode(q, view(k), view(v), lengths, mask=masks.causal(), impl="cuda")
        _check(out, want, dtype, f"cuda {view.__name__}")


def test_emulated_decode_split_counts_agree(decode_on_cpu):
    """1 to 12 splits of 300 keys (10 blocks): empty splits, splits of one block, the merge."""
    from vlfast import masks
    from .ops.test_attention_decode import _case, _run_and_check
    q, k, v, lengths, g = _case(2, 2, 1, 2, 16, 300, [300, 77], seed=3)
    outs = [_run_and_check("cuda", q, k, v, lengths, g, "paged-16", masks.causal(), num_splits=n) for n in (1, 3, 12)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


def test_emulated_decode_strided_query_and_append(decode_on_cpu):
    """q with permuted strides (the output keeps them); k_new / v_new appended in place before attending."""
    from vlfast import masks
    from .ops.test_attention_decode import _case, _oracle, _check
    b, hkv, s_max, d, new = 3, 2, 40, 16, 3
    q, k, v, lengths, g = _case(b, 4, hkv, new, d, s_max, [0, 10, 37], seed=9)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)
    k_new, v_new = torch.randn(b, hkv, new, d, generator=g), torch.randn(b, hkv, new, d, generator=g)
    kc, vc = k.clone(), v.clone()
    with torch.no_grad():
        out = vlfast.attention_decode(q, kc, vc, lengths, k_new=k_new, v_new=v_new, mask=masks.causal(), impl="cuda")
    keys = [torch.cat([k[row, :, :n], k_new[row]], 1) for row, n in enumerate(lengths.tolist())]
    values = [torch.cat([v[row, :, :n], v_new[row]], 1) for row, n in enumerate(lengths.tolist())]
    want, _ = _oracle(q, keys, values, (lengths + new).tolist(), masks.causal())
    _check(out, want, torch.float32, "cuda after append")


def test_emulated_decode_nan_and_unchecked_bad_pages(decode_on_cpu):
    """A NaN key inside a row's length makes that row NaN; with check_lengths=False a page index outside
    the cache, or a length past the capacity, gives NaN for that row instead of an outside read; other
    rows stay exact."""
    from vlfast import masks
    from .ops.test_attention_decode import _case, _layout
    q, k, v, lengths, g = _case(3, 2, 1, 1, 16, 30, [30, 12, 5], seed=8)
    k[1, :, 3] = float("nan")
    with torch.no_grad():
        want = vlfast.attention_decode(q, k, v, lengths, mask=masks.causal(), impl="reference")
        out = vlfast.attention_decode(q, k, v, lengths, mask=masks.causal(), impl="cuda")
        assert out[1].isnan().all()
        torch.testing.assert_close(out[[0, 2]], want[[0, 2]], rtol=2e-5, atol=2e-5)
        kp, vp, table = _layout(k.nan_to_num(), v.nan_to_num(), "paged-16", g)
        table[0, 1] = kp.shape[0]  # row 0's second page
        out = vlfast.attention_decode(q, kp, vp, lengths, block_table=table, check_lengths=False, impl="cuda")
        assert out[0].isnan().all() and not out[1:].isnan().any()
        too_long = torch.tensor([30, 31, 5], dtype=torch.int32)  # row 1 past S_max = 30
        out = vlfast.attention_decode(q, k.nan_to_num(), v.nan_to_num(), too_long, check_lengths=False, impl="cuda")
        assert out[1].isnan().all() and not out[[0, 2]].isnan().any()


def test_emulated_decode_opcheck(decode_on_cpu):
    from vlfast.ops.attention_decode import attention_decode_op
    from .ops.test_attention_decode import _case
    q, k, v, lengths, g = _case(2, 4, 2, 2, 16, 24, [24, 5])
    args = (q, k.nan_to_num(), v.nan_to_num(), lengths, 0, None, True, 0, None, [0, 0, 0, 0, 0], None, 0.25, 0,
            "cuda", True, False)
    torch.library.opcheck(attention_decode_op, args, test_utils=("test_schema", "test_faketensor"))


def _decode_args(**changes):
    """A valid attention_decode_forward call (fake addresses: the emulated module checks, then launches
    nothing when a check fails) with `changes` applied."""
    args = dict(q=256, k=256, v=256, out=256, lse=256, o_part=256, lse_part=256, lengths=256, block_table=0,
                span_ids=0, key_valid=0, batch=1, hq=4, hkv=2, sq=1, d=64, stride_qb=256, stride_qh=64, stride_qs=64,
                stride_kb=2048, stride_kh=1024, stride_ks=64, stride_vb=2048, stride_vh=1024, stride_vs=64,
                stride_ob=256, stride_oh=64, stride_os=64, cache_rows=1, page_size=16, max_pages=0, stride_bt=0,
                span_len=0, span_stride=0, valid_len=0, valid_stride=0, causal=True, window=0, dalle_kind=0,
                text_len=0, cols=1, dalle_half=0, scale=0.125, splits=1, dtype=2, device=0, stream=0)
    return {**args, **changes}


@pytest.mark.parametrize("changes,match", [
    (dict(k=0), "argument 'k' is a null pointer"),
    (dict(q=257), "argument 'q' must be 2-byte aligned"),
    (dict(d=257), r"argument 'd' \(head dim\) must be <= 256"),
    (dict(hq=3), r"argument 'hq' \(3\) must be a multiple of 'hkv' \(2\)"),
    (dict(sq=65), "hq / hkv x sq = 130, must be <= 128"),
    (dict(splits=0), r"argument 'splits' must be in \[1, 64\]"),
    (dict(splits=65), r"argument 'splits' must be in \[1, 64\]"),
    (dict(dtype=3), "argument 'dtype' must be a dtype code"),
    (dict(max_pages=2, stride_bt=2), "argument 'block_table' is a null pointer"),
    (dict(max_pages=4, block_table=256, stride_bt=2), r"'stride_bt' \(2\) must be >= 'max_pages' \(4\)"),
    (dict(block_table=256), "must be 0 for a contiguous cache"),
    (dict(cache_rows=2), r"'cache_rows' \(2\) must equal 'batch' \(1\)"),
    (dict(stride_ks=-64), "argument 'stride_ks' must be >= 0"),
    (dict(page_size=0), "argument 'page_size' must be >= 1"),
    (dict(span_ids=256, span_len=0), "argument 'span_len' must be >= 1"),
    (dict(dalle_kind=4), "argument 'dalle_kind' must be 0"),
    (dict(dalle_kind=1, cols=0), "argument 'cols' must be >= 1"),
    (dict(window=-1), "argument 'window' must be >= 0"),
    (dict(scale=float("nan")), "argument 'scale' must be finite"),
])
def test_emulated_decode_module_checks_arguments(emulated, changes, match):
    with pytest.raises(ValueError, match=match):
        emulated.attention_decode_forward(**_decode_args(**changes))


# --- similarity_topk's candidate filter -----------------------------------------------------------------
# cuda.emit against float64 scores (tests/ops/similarity_topk_emit_cases.py): every pair past the
# threshold by more than the codebook scan's certified error emitted, none below it by as much, scores
# within it, counts exact (overflowing rows too).

@pytest.fixture
def emit_on_cpu(emulated, monkeypatch):
    """similarity_topk's cuda.emit runs the emulated kernel on CPU tensors."""
    from vlfast.ops.similarity_topk import cuda
    monkeypatch.setattr(cuda, "why_not", lambda device, dtype: None)
    monkeypatch.setattr(cuda, "_extension", lambda q: _OnCpu(emulated))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    monkeypatch.setenv("VLFAST_POISON", "1")  # score slots start as NaN: unwritten ones would show
    return cuda


def _emit_and_check(cuda, n, m, d, dtype, capacity, context, seed=0, fractions=None):
    from .ops import similarity_topk_emit_cases as cases
    q, keys, alpha, beta = cases.random_case(n, m, d, dtype, seed=seed)
    threshold = cases.thresholds(q, keys, alpha, beta, *([fractions] if fractions else []))
    got = cuda.emit(q, keys, alpha, beta, threshold, capacity)
    return cases.check_emit(q, keys, alpha, beta, threshold, capacity, got, context), got


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n,m,d", [(1, 1, 1), (37, 300, 40), (130, 515, 100), (9, 200, 300)], ids=str)
def test_emulated_emit_is_the_thresholded_float64_scores(emit_on_cpu, n, m, d, dtype):
    """Odd shapes: one row and key; 3 key splits (the CPU plan: 4 "SMs"), a ragged last tile; two row
    blocks x 5 splits, D not a multiple of the 32-wide k step; D = 300 (900 bf16 features for float32).
    Rows let 1 %, 10 %, 50 %, all (-inf), one or no keys through; capacity M / 5 + 1 overflows the
    50 % and -inf rows."""
    capacity = m // 5 + 1
    stats, (count, _, _) = _emit_and_check(emit_on_cpu, n, m, d, dtype, capacity, f"{n}x{m}x{d} {dtype}")
    if n > 3:
        assert stats["overflow"] >= 2 and stats["emitted"] > 0
        assert (count[3::7] == m).all()  # -inf rows count every key, past capacity
        assert (count[5::7] == 0).all()  # a threshold above the best score: none
    assert stats["band"] <= max(4, n * m // 50)  # the error bound stays tight


@pytest.mark.parametrize("plan", ["one-split", "one-tile-per-split"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_emit_row_blocks_and_key_splits(emit_on_cpu, dtype, plan, monkeypatch):
    """Three row blocks; the key tiles all in one split (one block loops over three tiles) or one per
    split (a row's count gathers atomics from three blocks)."""
    from vlfast.ops.codebook_lookup import splits
    if plan == "one-split":
        monkeypatch.setattr(splits, "plan", lambda row_blocks, k, device, step: (1, -(-k // step) * step))
    else:
        monkeypatch.setattr(splits, "plan", lambda row_blocks, k, device, step: (-(-k // step), step))
    stats, _ = _emit_and_check(emit_on_cpu, 300, 333, 24, dtype, 70, f"{plan} {dtype}", seed=1)
    assert stats["overflow"] > 0 and stats["emitted"] > 1000


def test_emulated_emit_every_key_and_count_only(emit_on_cpu):
    """-inf thresholds with room for all: every key once, with its score; capacity 0 counts only."""
    from .ops import similarity_topk_emit_cases as cases
    n, m = 50, 260
    q, keys, alpha, beta = cases.random_case(n, m, 33, torch.bfloat16, seed=2)
    threshold = torch.full((n,), -float("inf"))
    got = emit_on_cpu.emit(q, keys, alpha, beta, threshold, m + 3)
    cases.check_emit(q, keys, alpha, beta, threshold, m + 3, got, "all keys")
    count, cols, _ = got
    assert (count == m).all()
    assert torch.equal(cols[:, :m].sort(dim=1).values, torch.arange(m, dtype=torch.int32).expand(n, m))
    threshold = cases.thresholds(q, keys, alpha, beta)
    count0, cols0, scores0 = emit_on_cpu.emit(q, keys, alpha, beta, threshold, 0)
    assert cols0.shape == (n, 0) and scores0.shape == (n, 0)
    full = emit_on_cpu.emit(q, keys, alpha, beta, threshold, m)
    assert torch.equal(count0, full[0])  # the same fp32 comparisons, with or without slots


def test_emulated_emit_never_touches_rows_or_keys_past_the_ends(emit_on_cpu, emulated):
    """The raw kernel on buffers longer than n and m: keys past m (which would qualify at -inf) are
    never counted, counts and slots of rows past n never written."""
    from vlfast.ops.codebook_lookup.cuda import kernel_rows
    from .ops import similarity_topk_emit_cases as cases
    n, m, d, cap, extra = 70, 140, 16, 150, 60
    q, keys, alpha, beta = cases.random_case(n + extra, m + extra, d, torch.bfloat16, seed=3)
    q, keys = kernel_rows(q), kernel_rows(keys)
    threshold = torch.full((n + extra,), -float("inf"))
    count = torch.zeros(n + extra, dtype=torch.int32)
    count[n:] = -7
    cols = torch.full((n + extra, cap), -7, dtype=torch.int32)
    scores = torch.full((n + extra, cap), -7.0)
    emulated.similarity_topk_emit(q=q.data_ptr(), keys=keys.data_ptr(), alpha=alpha.data_ptr(),
                                  beta=beta.data_ptr(), threshold=threshold.data_ptr(), count=count.data_ptr(),
                                  cols=cols.data_ptr(), scores=scores.data_ptr(), work=0, work_size=0, n=n, m=m,
                                  d=d, stride_q=q.stride(0), stride_k=keys.stride(0), capacity=cap,
                                  keys_per_split=128, splits=2, dtype=2, device=0, stream=0)
    assert (count[:n] == m).all() and (count[n:] == -7).all()
    assert (cols[n:] == -7).all() and (scores[n:] == -7).all() and (cols[:, m:] == -7).all()
    assert torch.equal(cols[:n, :m].sort(dim=1).values, torch.arange(m, dtype=torch.int32).expand(n, m))


def test_emulated_emit_copies_rows_off_16_byte_boundaries(emit_on_cpu):
    from .ops import similarity_topk_emit_cases as cases
    q, keys, alpha, beta = cases.random_case(20, 50, 100, torch.bfloat16, seed=4)
    view = torch.cat([torch.zeros(1, 100, dtype=torch.bfloat16), q])[1:]  # data_ptr 200 bytes in
    assert view.data_ptr() % 16
    for qq, kk, what in ((view, keys, "mid-row view"), (q[:, :50], keys[:, :50], "strided rows"),
                         (q, keys[:1].expand(50, 100), "expanded keys")):
        threshold = cases.thresholds(qq, kk, alpha, beta)
        got = emit_on_cpu.emit(qq, kk, alpha, beta, threshold, 20)
        cases.check_emit(qq, kk, alpha, beta, threshold, 20, got, what)


def test_emulated_emit_module_checks_arguments_as_the_real_one(emulated):
    args = dict(q=16, keys=16, alpha=16, beta=16, threshold=16, count=16, cols=16, scores=16, work=0, work_size=0,
                n=1, m=1, d=8, stride_q=8, stride_k=8, capacity=4, keys_per_split=128, splits=1, dtype=2, device=0,
                stream=0)
    for changes, match in [(dict(threshold=0), "argument 'threshold' is a null pointer"),
                           (dict(dtype=0), "argument 'work' is a null pointer"),
                           (dict(m=0), "argument 'm' must be >= 1"),
                           (dict(capacity=-1), "argument 'capacity' must be >= 0"),
                           (dict(cols=0), "argument 'cols' is a null pointer"),
                           (dict(keys=24), "argument 'keys' must be 16-byte aligned"),
                           (dict(keys_per_split=100), "argument 'keys_per_split' must be a multiple of 128"),
                           (dict(splits=2), r"argument 'splits' must be ceil\(m / keys_per_split\) = 1")]:
        with pytest.raises(ValueError, match=match):
            emulated.similarity_topk_emit(**{**args, **changes})


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_exact_top_k_on_the_cuda_filter(emit_on_cpu, dtype, metric):
    """cuda.similarity_topk (filter.py's search over cuda.emit) is the definition's top k exactly,
    exact ties to the lower index."""
    from vlfast.ops.similarity_topk import reference
    g = torch.Generator().manual_seed(7)
    q = torch.randn(40, 24, generator=g).to(dtype)
    keys = torch.randn(700, 24, generator=g).to(dtype)
    keys[100:103] = keys[7]
    q[:3] = keys[7]
    index, score = emit_on_cpu.similarity_topk(q, keys, 5, metric)
    want_index, want_score = reference.similarity_topk(q, keys, 5, metric)
    assert torch.equal(index, want_index) and torch.equal(score, want_score)
    assert emit_on_cpu.last_call["fallback"] == 0  # the filter certified every row itself


# --- similarity_topk's exact pair scores ----------------------------------------------------------------
# cuda.pair_scores (csrc/similarity_topk/pair_scores.cu) against the definition: torch.equal, the same
# float64 bits, every metric and dtype.

def _pair_case(n, m, d, dtype, seed):
    """q (n, d) and keys (m, d) whose elements span 24 binades, each its own (so that l2's squared
    differences round, and an fma would give other bits for many pairs; every sum rounds), a zero
    query row 0 and a zero key 1; 200 random pairs plus the zero ones."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, d, generator=g) * 2.0 ** torch.randint(-12, 12, (n, d), generator=g)).to(dtype)
    keys = (torch.randn(m, d, generator=g) * 2.0 ** torch.randint(-12, 12, (m, d), generator=g)).to(dtype)
    q[0] = 0
    keys[1] = 0
    row = torch.cat([torch.randint(0, n, (200,), generator=g), torch.tensor([0, 0, 2])])
    col = torch.cat([torch.randint(0, m, (200,), generator=g), torch.tensor([1, 3, 1])])
    return q, keys, row, col


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [1, 77, 300])
def test_emulated_pair_scores_are_the_definitions_bits(emit_on_cpu, d, dtype, metric):
    from vlfast.ops.similarity_topk import reference
    q, keys, row, col = _pair_case(30, 50, d, dtype, seed=d)
    got = emit_on_cpu.pair_scores(q, keys, row, col, metric)
    want = reference.pair_scores(q[row], keys[col], metric)
    assert got.dtype == torch.float64 and got.shape == (row.numel(),)
    assert torch.equal(got, want), f"{(got != want).sum()} of {got.numel()} differ"
    zero = (row == 0) | (col == 1)
    if metric == "cosine":
        assert (got[zero] == 0).all() and (got[~zero].abs() <= 1 + 1e-12).all()
    if d > 1 and metric == "ip":  # the comparison sees the order: summed backwards, some bits differ
        backwards = (q[row].double() * keys[col].double()).flip(1).cumsum(1)[:, -1]
        assert not torch.equal(backwards, want)


def test_emulated_pair_scores_on_strided_expanded_and_empty_inputs(emit_on_cpu):
    """Rows off any alignment (a mid-row view, a column slice), expanded keys (copied), int32 indices,
    and no pairs at all."""
    from vlfast.ops.similarity_topk import reference
    q, keys, row, col = _pair_case(30, 50, 100, torch.bfloat16, seed=11)
    view = torch.cat([torch.zeros(1, 100, dtype=torch.bfloat16), q])[1:]
    assert view.data_ptr() % 16
    for qq, kk, what in ((view, keys, "mid-row view"), (q[:, 3:60], keys[:, 3:60], "column slices"),
                         (q, keys[:1].expand(50, 100), "expanded keys")):
        for metric in ("ip", "cosine", "l2"):
            got = emit_on_cpu.pair_scores(qq, kk, row.int(), col.int(), metric)
            assert torch.equal(got, reference.pair_scores(qq[row], kk[col], metric)), f"{what} {metric}"
    empty = torch.empty(0, dtype=torch.int64)
    for metric in ("ip", "cosine", "l2"):
        assert emit_on_cpu.pair_scores(q, keys, empty, empty, metric).shape == (0,)


def test_emulated_pair_scores_module_layout_and_checks(emulated):
    """The raw binding: cosine's (3, P) sums, NaN for indices out of range, nothing written past P; and
    its argument checks."""
    from vlfast.ops.codebook_lookup.reference import ordered_row_sums
    q, keys, row, col = _pair_case(8, 9, 13, torch.float32, seed=5)
    row[:2] = torch.tensor([-1, 8])  # past the ends of q (n = 8)
    col[2] = 9  # past keys (m = 9)
    p = row.numel()
    out = torch.full((3, p + 4), -7.0, dtype=torch.float64)
    flat = out.view(-1)[:3 * p]
    emulated.similarity_topk_pair_scores(q=q.data_ptr(), keys=keys.data_ptr(), row=row.data_ptr(), col=col.data_ptr(),
                                         out=out.data_ptr(), p=p, n=8, m=9, d=13, stride_q=13, stride_k=13, metric=1,
                                         dtype=0, device=0, stream=0)
    sums = flat.view(3, p)
    assert sums[:, :3].isnan().all() and (out.view(-1)[3 * p:] == -7).all()
    x, y = q[row[3:]].double(), keys[col[3:]].double()
    for got, want in zip(sums[:, 3:], (ordered_row_sums(x * y), ordered_row_sums(x * x), ordered_row_sums(y * y))):
        assert torch.equal(got, want)
    args = dict(q=16, keys=16, row=16, col=16, out=16, p=5, n=2, m=3, d=8, stride_q=8, stride_k=8, metric=0,
                dtype=2, device=0, stream=0)
    for changes, match in [(dict(metric=3), r"argument 'metric' must be a metric code: 0 \(ip\), 1 \(cosine\)"),
                           (dict(p=0), "argument 'p' must be >= 1"),
                           (dict(row=0), "argument 'row' is a null pointer"),
                           (dict(col=20), "argument 'col' must be 8-byte aligned"),
                           (dict(out=0), "argument 'out' is a null pointer"),
                           (dict(keys=17), "argument 'keys' must be 2-byte aligned"),
                           (dict(stride_q=7), "argument 'q': the row stride")]:
        with pytest.raises(ValueError, match="^vlfast._C.similarity_topk_pair_scores: " + match):
            emulated.similarity_topk_pair_scores(**{**args, **changes})


@pytest.mark.parametrize("metric", ["ip", "cosine", "l2"])
def test_emulated_top_k_scores_its_candidates_with_the_pair_kernel(emit_on_cpu, metric, monkeypatch):
    """cuda.similarity_topk hands filter.search cuda.pair_scores (one launch), not the torch gather."""
    from vlfast.ops.similarity_topk import reference
    calls = []
    kernel = emit_on_cpu.pair_scores

    def spy(*args):
        calls.append(args[2].numel())
        return kernel(*args)
    monkeypatch.setattr(emit_on_cpu, "pair_scores", spy)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(20, 40, generator=g).to(torch.float16)
    keys = torch.randn(500, 40, generator=g).to(torch.float16)
    index, score = emit_on_cpu.similarity_topk(q, keys, 4, metric)
    want_index, want_score = reference.similarity_topk(q, keys, 4, metric)
    assert torch.equal(index, want_index) and torch.equal(score, want_score)
    assert emit_on_cpu.last_call["fallback"] == 0
    assert calls and sum(calls) == emit_on_cpu.last_call["rescored"] > 0
