"""vlfast.attention_decode against a float64 oracle written here: per row, dense softmax attention over
the first L_b keys (gathered from the cache by hand), with the mask's predicate at cache positions.
Contiguous, transposed and paged caches (page sizes 1, 16, 256, shuffled page tables), GQA, every mask
kind, the in-place append, split counts, bad input. Triton runs in the interpreter here."""
import math

import pytest
import torch

import vlfast
from vlfast import masks
from vlfast.ops.attention_decode import attention_decode_op, kv_cache_append

IMPLS = ["reference", "torch", pytest.param("triton", marks=pytest.mark.triton)]
POISON = float("nan")  # cache slots past a row's length: a kernel that reads them gives NaN


def _oracle(q, keys, values, lengths, mask):
    """out (B, Hq, Sq, D), lse (B, Hq, Sq) float64; keys / values: per row (Hkv, L_b, D)."""
    b, hq, sq, d = q.shape
    out = torch.zeros(b, hq, sq, d, dtype=torch.float64)
    lse = torch.full((b, hq, sq), -math.inf, dtype=torch.float64)
    scale = 1 / math.sqrt(d)
    for row, length in enumerate(lengths):
        k, v = keys[row].double(), values[row].double()
        group = hq // k.shape[0]
        for h in range(hq):
            for i in range(sq):
                p_q = length - sq + i
                kept = [j for j in range(length)
                        if mask is None or bool(mask.allowed(torch.tensor(p_q), torch.tensor(j), torch.tensor(row)))]
                if not kept:
                    continue
                s = scale * (k[h // group, kept] @ q[row, h, i].double())
                lse[row, h, i] = torch.logsumexp(s, 0)
                out[row, h, i] = torch.softmax(s, 0) @ v[h // group, kept]
    return out, lse


def _paged(cache, page, generator=None, table=None):
    """A paged copy of a contiguous cache (B, Hkv, S, D) and its block table: shuffled pages (or the
    given table's), poisoned spare pages."""
    b, hkv, s, d = cache.shape
    per_row = -(-s // page)
    if table is None:
        order = torch.randperm(b * per_row + 3, generator=generator)  # 3 spare pages no row uses
        table = order[: b * per_row].view(b, per_row).to(torch.int32)
    pages = torch.full((b * per_row + 3, hkv, page, d), POISON, dtype=cache.dtype)
    for row in range(b):
        for j in range(per_row):
            chunk = cache[row, :, j * page:(j + 1) * page]
            pages[table[row, j], :, : chunk.shape[1]] = chunk
    return pages, table


def _case(b, hq, hkv, sq, d, s_max, lengths, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s_max, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s_max, d, generator=g).to(dtype)
    for row, length in enumerate(lengths):  # past the length: poison
        k[row, :, length:] = POISON
        v[row, :, length:] = POISON
    return q, k, v, torch.tensor(lengths, dtype=torch.int32), g


def _layout(k, v, layout, g):
    """(k_cache, v_cache, block_table) in the given layout, holding the same keys and values."""
    if layout == "contiguous":
        return k, v, None
    if layout == "transposed":  # a (B, S_max, Hkv, D) cache passed as its (B, Hkv, S_max, D) view
        return k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2), None
    kp, table = _paged(k, int(layout.split("-")[1]), g)
    return kp, _paged(v, kp.shape[2], table=table)[0], table


def _check(got, want, dtype, what=""):
    tol = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-12), torch.bfloat16: (3e-2, 3e-2),
           torch.float16: (5e-3, 5e-3)}[dtype]
    torch.testing.assert_close(got.double(), want, rtol=tol[0], atol=tol[1], msg=lambda m: f"{what}: {m}")


def _run_and_check(impl, q, k, v, lengths, g, layout="contiguous", mask=None, num_splits=0, finite_tail=False):
    if finite_tail:  # what the caller promises: every slot past a row's length finite (here 0)
        k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    kc, vc, table = _layout(k, v, layout, g)
    with torch.no_grad():
        out, lse = vlfast.attention_decode(q, kc, vc, lengths, block_table=table, mask=mask, num_splits=num_splits,
                                           return_lse=True, finite_tail=finite_tail, impl=impl)
    keys = [k[row, :, :n] for row, n in enumerate(lengths.tolist())]
    values = [v[row, :, :n] for row, n in enumerate(lengths.tolist())]
    want_out, want_lse = _oracle(q, keys, values, lengths.tolist(), mask)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.dtype == torch.float32 if q.dtype != torch.float64 \
        else lse.dtype == torch.float64
    _check(out, want_out, q.dtype, f"{impl} {layout} out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    _check(lse.nan_to_num(neginf=0.0), want_lse.nan_to_num(neginf=0.0), q.dtype, f"{impl} {layout} lse")
    return out


# --- layouts, lengths, GQA ----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "paged-1", "paged-16", "paged-256"])
def test_layouts_and_lengths(impl, layout):
    """Lengths 0, 1, odd and full, different per row; S_max not a multiple of any block."""
    q, k, v, lengths, g = _case(4, 4, 2, 1, 32, 67, [0, 1, 37, 67])
    _run_and_check(impl, q, k, v, lengths, g, layout)


def test_paged_rows_gathered_into_kept_buffers_serve_calls_of_other_shapes():
    """impl="torch" gathers a paged cache's rows into per-thread scratch buffers: a larger call, a smaller
    one and a larger one again (other heads, head dims and dtypes) each get their own keys' answer."""
    for seed, (b, hq, hkv, d, s_max, lengths, dtype) in enumerate([
            (3, 4, 2, 32, 67, [5, 67, 40], torch.float32), (2, 2, 1, 16, 20, [20, 3], torch.float32),
            (4, 6, 3, 24, 90, [90, 1, 0, 77], torch.float64), (2, 4, 4, 32, 67, [67, 66], torch.float32)]):
        q, k, v, lengths, g = _case(b, hq, hkv, 1, d, s_max, lengths, dtype, seed)
        _run_and_check("torch", q, k, v, lengths, g, "paged-16")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hq,hkv", [(3, 3), (4, 2), (7, 1), (8, 1)])
@pytest.mark.parametrize("sq", [1, 5, 16])
def test_gqa_groups_and_query_counts(impl, hq, hkv, sq):
    q, k, v, lengths, g = _case(2, hq, hkv, sq, 16, 45, [3, 45], seed=hq * 100 + sq)
    _run_and_check(impl, q, k, v, lengths, g, "paged-16", masks.causal())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("d", [64, 80, 128, 256])
def test_head_dims(impl, d):
    q, k, v, lengths, g = _case(2, 2, 1, 2, d, 40, [40, 9], seed=d)
    _run_and_check(impl, q, k, v, lengths, g, "contiguous", masks.causal())


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_caches(impl, dtype):
    q, k, v, lengths, g = _case(3, 4, 2, 2, 64, 70, [70, 13, 1], dtype=dtype)
    _run_and_check(impl, q, k, v, lengths, g, "paged-16", masks.causal())


def test_float64_on_the_reference_and_torch_paths():
    q, k, v, lengths, g = _case(2, 2, 2, 3, 8, 20, [20, 6], dtype=torch.float64)
    for impl in ("reference", "torch"):
        _run_and_check(impl, q, k, v, lengths, g, "paged-16", masks.causal())


# --- masks --------------------------------------------------------------------------------------------

def _masks(s_max, b):
    g = torch.Generator().manual_seed(7)
    spans = torch.full((s_max,), -1, dtype=torch.int32)
    spans[2:9] = 0
    spans[12:20] = 1
    spans_b = torch.stack([spans.roll(3 * row) for row in range(b)])
    valid = torch.rand(b, s_max, generator=g) > 0.3
    return {"none": None, "causal": masks.causal(), "window": masks.sliding_window(5),
            "spans": masks.spans(spans), "spans-per-row": masks.spans(spans_b),
            "dalle-row": masks.dalle(4, 5, 6, "row"), "dalle-column": masks.dalle(4, 5, 6, "column"),
            "dalle-conv": masks.dalle(4, 5, 6, "conv", kernel=3),
            "padding": masks.key_padding(valid), "causal+padding": masks.causal() & masks.key_padding(valid)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(_masks(34, 2)))
def test_every_mask_kind(impl, kind):
    """Positions in cache coordinates; Sq = 3 queries at the end of each row (4 is shorter than Sq
    plus the window on some rows, 1 row leaves the first queries before position 0)."""
    q, k, v, lengths, g = _case(2, 2, 1, 3, 16, 34, [34, 2], seed=11)
    _run_and_check(impl, q, k, v, lengths, g, "paged-16", _masks(34, 2)[kind])


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "paged-16"])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("kind", list(_masks(34, 4)))
def test_finite_tails_are_read_masked(impl, layout, sq, kind):
    """finite_tail=True (KVCache's): the slots past the lengths hold 0 and the torch path reads them under
    the mask instead of copying the rows; rows of 0, fewer than Sq, and all the keys."""
    q, k, v, lengths, g = _case(4, 4, 2, sq, 16, 34, [34, 2, 0, 17], seed=13)
    _run_and_check(impl, q, k, v, lengths, g, layout, _masks(34, 4)[kind], finite_tail=True)


@pytest.mark.parametrize("layout", ["contiguous", "paged-16"])
@pytest.mark.parametrize("sq,hq", [(1, 2), (3, 2), (3, 4)])
@pytest.mark.parametrize("length", [34, 19, 3])
@pytest.mark.parametrize("kind", ["causal", "window", "spans", "dalle-row", "dalle-column", "dalle-conv"])
def test_one_length_for_every_row_under_a_batch_wide_mask(layout, sq, hq, length, kind):
    """The torch path's cached per-mask bias (every row the same length, a mask without per-row parts):
    the bias rows of the queries' positions, the keys read from the first kept to the last; GQA groups
    with Sq > 1; rows whose first queries keep nothing (DALL-E's layers at the grid's start)."""
    q, k, v, lengths, g = _case(2, hq, 2, sq, 16, 34, [length, length], seed=length * 10 + sq)
    _run_and_check("torch", q, k, v, lengths, g, layout, _masks(34, 2)[kind])


@pytest.mark.parametrize("runs", ["views", "gathered"])
@pytest.mark.parametrize("layout", ["contiguous", "paged-16"])
@pytest.mark.parametrize("hq", [2, 4])
@pytest.mark.parametrize("length", [300, 277, 40])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_one_query_reads_only_the_keys_its_dalle_layer_keeps(monkeypatch, runs, layout, hq, length, kind):
    """Past GATHER_MIN_KEYS keys in its span, a step's one query under a DALL-E layer reads only the keys it
    keeps (a row: the text and its row so far) instead of masking the rest, GQA groups sharing them: as
    views of the cache, one kernel call per arithmetic run of them merged by lse (row and column layers), or
    gathered into one call (more runs; forced here with MAX_KEY_RUNS = 0)."""
    from vlfast.ops.attention_decode import torch_impl
    if runs == "gathered":
        monkeypatch.setattr(torch_impl, "MAX_KEY_RUNS", 0)
    mask = masks.dalle(64, 16, 16, kind, kernel=5)
    assert 64 + 16 * 16 - 64 >= torch_impl.GATHER_MIN_KEYS
    q, k, v, lengths, g = _case(2, hq, 2, 1, 16, 320, [length, length], seed=length + hq)
    _run_and_check("torch", q, k, v, lengths, g, layout, mask)


@pytest.mark.parametrize("kind, want", [("row", 2), ("column", 2), ("conv", 4)])
def test_a_dalle_layers_kept_keys_as_runs(kind, want):
    """What _forward_pattern reads for the last query of 300 keys: the text, then the layer's image keys (its
    row so far; every 16th key of its column; the 5 x 5 window's rows up to it), as arithmetic runs that
    cover exactly the kept keys."""
    from vlfast.ops.attention_decode import torch_impl
    mask = masks.dalle(64, 16, 16, kind, kernel=5)
    pat = torch_impl.pattern(mask, 320, torch.float32, torch.device("cpu"))
    cols, runs = pat.kept_keys(299, 300)
    assert len(runs) == want and runs[0] == (0, 64, 1)
    assert [c for start, stop, step in runs for c in range(start, stop, step)] == cols.tolist()
    assert torch_impl.arithmetic_runs([0, 1, 2, 9, 13, 17]) == [(0, 3, 1), (9, 18, 4)]
    assert torch_impl.arithmetic_runs([5]) == [(5, 6, 1)] and torch_impl.arithmetic_runs([]) == []
    assert torch_impl.arithmetic_runs([3, 10]) == [(3, 11, 7)]


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_vlfast_attention_over_the_same_keys(impl):
    q, k, v, lengths, g = _case(3, 4, 2, 4, 16, 40, [40, 17, 5], seed=5)
    mask = masks.dalle(8, 4, 8, "column")
    with torch.no_grad():
        got = vlfast.attention_decode(q, k, v, lengths, mask=mask, impl=impl)
        for row, n in enumerate(lengths.tolist()):
            want = vlfast.attention(q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n], mask=mask,
                                    impl="reference")
            torch.testing.assert_close(got[row:row + 1], want, rtol=2e-5, atol=2e-5)


@pytest.mark.triton
def test_split_counts_agree():
    q, k, v, lengths, g = _case(2, 4, 2, 2, 32, 300, [300, 77], seed=3)
    outs = [_run_and_check("triton", q, k, v, lengths, g, "paged-16", masks.causal(), num_splits=n)
            for n in (1, 2, 3, 7, 16)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-6)


# --- the in-place append -----------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lengths", [[0, 10, 37], [12, 12, 12]], ids=["ragged", "uniform"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "paged-16", "paged-1"])
def test_append_writes_in_place_and_touches_nothing_else(impl, layout, lengths):
    """Ragged rows, and rows of one length (on a CPU a contiguous cache then takes one slice copy)."""
    b, hkv, s_max, d, new = 3, 2, 40, 16, 3
    q, k, v, lengths, g = _case(b, 4, hkv, new, d, s_max, lengths, seed=9)
    k_new = torch.randn(b, hkv, new, d, generator=g)
    v_new = torch.randn(b, hkv, new, d, generator=g)
    kc, vc, table = _layout(k, v, layout, g)
    before_k, before_v = kc.clone(), vc.clone()
    with torch.no_grad():
        out = vlfast.attention_decode(q, kc, vc, lengths, k_new=k_new, v_new=v_new, block_table=table,
                                      mask=masks.causal(), impl=impl)
    # expected cache: the new tokens at lengths .. lengths + new - 1, every other slot as it was
    k_full, v_full = k.clone(), v.clone()
    for row, n in enumerate(lengths.tolist()):
        k_full[row, :, n:n + new] = k_new[row]
        v_full[row, :, n:n + new] = v_new[row]
    if table is None:
        want_k, want_v = _layout(k_full, v_full, layout, g)[:2]
    else:  # the expected pages: the same table
        want_k, want_v = (_paged(x, kc.shape[2], table=table)[0] for x in (k_full, v_full))
    assert torch.equal(kc.isnan(), want_k.isnan()) and torch.equal(vc.isnan(), want_v.isnan())
    assert torch.equal(kc.nan_to_num(), want_k.nan_to_num()) and torch.equal(vc.nan_to_num(), want_v.nan_to_num())
    keys = [k_full[row, :, :n + new] for row, n in enumerate(lengths.tolist())]
    values = [v_full[row, :, :n + new] for row, n in enumerate(lengths.tolist())]
    want, _ = _oracle(q, keys, values, (lengths + new).tolist(), masks.causal())
    _check(out, want, torch.float32, f"{impl} {layout} after append")


# --- compile and opcheck ---------------------------------------------------------------------------------

def test_opcheck():
    q, k, v, lengths, g = _case(2, 4, 2, 2, 16, 24, [24, 5])
    k_new, v_new = torch.randn(2, 2, 1, 16), torch.randn(2, 2, 1, 16)
    torch.library.opcheck(kv_cache_append, (k.nan_to_num(), v.nan_to_num(), k_new, v_new, lengths - 1, None, True))
    args = (q, k, v, lengths, 0, None, True, 0, None, [0, 0, 0, 0, 0], None, 0.25, 0, "torch", True, False)
    torch.library.opcheck(attention_decode_op, args, test_utils=("test_schema", "test_faketensor"))


def test_decode_step_compiles_fullgraph():
    torch._dynamo.reset()
    q, k, v, lengths, g = _case(2, 4, 2, 1, 16, 24, [10, 3])
    k, v = k.nan_to_num(), v.nan_to_num()
    k_new, v_new = torch.randn(2, 2, 1, 16, generator=g), torch.randn(2, 2, 1, 16, generator=g)

    def step(q, kc, vc, lengths, k_new, v_new):
        return vlfast.attention_decode(q, kc, vc, lengths, k_new=k_new, v_new=v_new, mask=masks.causal(), impl="torch")

    kc, vc = k.clone(), v.clone()
    with torch.no_grad():
        want = step(q, kc, vc, lengths, k_new, v_new)
        kc2, vc2 = k.clone(), v.clone()
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, kc2, vc2, lengths, k_new, v_new)
    torch.testing.assert_close(got, want)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)  # the append happened in place under compile too


# --- bad input -------------------------------------------------------------------------------------------

def _good():
    q, k, v, lengths, g = _case(2, 4, 2, 1, 16, 24, [10, 3])
    return dict(q=q, k_cache=k.nan_to_num(), v_cache=v.nan_to_num(), cache_seqlens=lengths)


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(cache_seqlens=torch.tensor([25, 3], dtype=torch.int32)), ValueError, "holds 25 tokens"),
    (lambda a: a.update(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "must be >= 0"),
    (lambda a: a.update(cache_seqlens=torch.tensor([1.0, 3.0])), TypeError, "cache_seqlens must be an int32"),
    (lambda a: a.update(cache_seqlens=torch.tensor([1], dtype=torch.int32)), TypeError, r"shape \(2,\)"),
    (lambda a: a.update(k_cache=a["k_cache"].half()), TypeError, "k_cache must have q's dtype"),
    (lambda a: a.update(v_cache=a["v_cache"][:, :, :20]), ValueError, "one shape"),
    (lambda a: a.update(q=a["q"][:, :3]), ValueError, "multiple of the caches' 2 kv heads"),
    (lambda a: a.update(q=a["q"][..., :8]), ValueError, "share a non-zero head_dim"),
    (lambda a: a.update(q=a["q"][:, :, :0]), ValueError, "at least one query"),
    (lambda a: a.update(k_cache=a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3),
                        v_cache=a["v_cache"]), ValueError, "unit stride along head_dim"),
    (lambda a: a.update(k_new=torch.randn(2, 2, 1, 16)), ValueError, "k_new and v_new go together"),
    (lambda a: a.update(k_new=torch.randn(2, 2, 1, 16), v_new=torch.randn(2, 2, 1, 16),
                        cache_seqlens=torch.tensor([24, 3], dtype=torch.int32)), ValueError, "holds 25 tokens"),
    (lambda a: a.update(mask=masks.key_padding(torch.ones(2, 8, dtype=torch.bool))), ValueError,
     "key_padding cover 8 cache positions but a row holds 10"),
    (lambda a: a.update(mask=masks.key_padding(torch.ones(3, 24, dtype=torch.bool))), ValueError, r"\(2, S\)"),
    (lambda a: a.update(mask=masks.dalle(2, 2, 2, "row")), ValueError, "DALL-E mask covers 2 \\+ 2 x 2"),
    (lambda a: a.update(num_splits=-1), ValueError, "num_splits must be an int >= 0"),
    (lambda a: a.update(mask="causal"), TypeError, "mask must be a vlfast.masks.Mask"),
])
def test_bad_input_is_named(change, error, match):
    args = _good()
    change(args)
    with pytest.raises(error, match=match):
        with torch.no_grad():
            vlfast.attention_decode(**args, impl="torch")


def test_bad_pages_are_named():
    args = _good()
    kp, table = _paged(args["k_cache"], 8, torch.Generator().manual_seed(0))
    vp, _ = _paged(args["v_cache"], 8, table=table)
    table[0, 1] = kp.shape[0]  # row 0 (10 tokens) uses pages 0 and 1
    with pytest.raises(ValueError, match=r"page indices outside \[0, 9\)"):
        vlfast.attention_decode(args["q"], kp, vp, args["cache_seqlens"], block_table=table, impl="torch")
    table[0, 1] = 0
    table[1, 2] = -5  # row 1 (3 tokens) never reads its third page: allowed
    vlfast.attention_decode(args["q"], kp, vp, args["cache_seqlens"], block_table=table, impl="torch")
    with pytest.raises(TypeError, match="block_table must be an int32"):
        vlfast.attention_decode(args["q"], kp, vp, args["cache_seqlens"], block_table=table.float(), impl="torch")


def test_gradients_are_refused_with_a_clear_error():
    args = _good()
    args["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="is for inference and has no gradients"):
        vlfast.attention_decode(**args)



def test_torch_paths_off_the_cpu_kernel_agree():
    """The GEMM composition that impl="torch" uses on devices without PyTorch's CPU flash kernel gives
    that kernel's outputs, fully masked rows and NaN inputs included (checked here on a CPU)."""
    from vlfast.ops.attention_decode import torch_impl
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    keep = torch.rand(2, 1, 5, 11, generator=g) > 0.5
    keep[0, 0, 2] = False  # a row that keeps nothing
    bias = torch.zeros(keep.shape).masked_fill_(~keep, float("-inf"))
    q[1, 2, 4, 0] = float("nan")
    out, lse = torch_impl._matmul_softmax(q, k, v, bias, 0.3)
    want_out, want_lse = torch_impl._FLASH(q, k, v, attn_mask=bias, scale=0.3)
    ok = keep.any(-1).expand(2, 3, 5)
    torch.testing.assert_close(out[ok], want_out[ok], equal_nan=True)
    torch.testing.assert_close(lse[ok], want_lse[ok], equal_nan=True)
    assert (out[~ok] == 0).all() and torch.isneginf(lse[~ok]).all()
    assert out[1, 2, 4].isnan().all()


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_inside_the_lengths_propagates_and_nothing_else(impl):
    """A NaN key that a query attends makes that query's output NaN; past the lengths NaN is ignored
    (the cache is poisoned there); other rows stay exact."""
    q, k, v, lengths, g = _case(3, 2, 1, 1, 16, 30, [30, 12, 5], seed=8)
    k[1, :, 3] = float("nan")  # inside row 1
    with torch.no_grad():
        out = vlfast.attention_decode(q, k, v, lengths, mask=masks.causal(), impl=impl)
    assert out[1].isnan().all()
    assert not out[0].isnan().any() and not out[2].isnan().any()


def test_unchecked_lengths_give_the_checked_result():
    """check_lengths=False (the generation loop's) skips only the host-side checks."""
    q, k, v, lengths, g = _case(3, 4, 2, 2, 16, 30, [30, 7, 0], seed=12)
    for impl in ("reference", "torch"):
        with torch.no_grad():
            a = vlfast.attention_decode(q, k, v, lengths, mask=masks.causal(), impl=impl)
            b = vlfast.attention_decode(q, k, v, lengths, mask=masks.causal(), check_lengths=False, impl=impl)
        assert torch.equal(a, b)
