"""vlfast.attention / attention_varlen and vlfast.masks against float64 with explicit dense masks."""
import pytest
import torch

import vlfast
import vlfast.masks as M
from vlfast.ops.attention import attention, attention_backward, attention_forward, attention_varlen

from .attention_cases import (loop_mask, make_qkv, pytorch_same_dtype, reference64, run_vlfast, span_ids,
                              vlfast_mask)
from .clip_loss_cases import assert_close64, assert_relative_rule

NAMES = ("out", "dq", "dk", "dv")
TRITON = pytest.param("triton", marks=pytest.mark.triton)

# spans at the start, in the middle and at the end; two images of >= 2 tokens; a prefix off block edges
MASK_CASES = [
    ("none", {}),
    ("causal", {}),
    ("window", {"window": 7}),
    ("spans", {"spans": [(0, 19)]}),                        # LLaVA: an image prefix not on a block edge
    ("spans", {"spans": [(3, 2), (20, 9), (44, 6)]}),       # images at start, middle and end
    ("dalle-row", {"text_len": 5, "rows": 5, "cols": 9}),
    ("dalle-column", {"text_len": 5, "rows": 5, "cols": 9}),
    ("dalle-conv", {"text_len": 5, "rows": 5, "cols": 9, "kernel": 3}),
]


def _params(kind, p, sk):
    p = dict(p)
    if kind == "spans":
        p["ids"] = span_ids(sk, p.pop("spans"))
    return p


def _check(b, h, h_kv, sq, sk, d, dtype, kind, p, impl, keep_extra=None, mask_extra=None):
    p = _params(kind, p, sk)
    keep = loop_mask(kind, sq, sk, **p)[None, None]
    mask = vlfast_mask(kind, sk, **p)
    if keep_extra is not None:
        keep = keep & keep_extra[:, None]
        mask = mask_extra if mask is None else mask & mask_extra
    q, k, v, do = make_qkv(b, h, h_kv, sq, sk, d, dtype)
    ref = reference64(q, k, v, do, keep)
    got = run_vlfast(q, k, v, do, mask, impl)
    ctx = f"{impl} {kind} b{b} h{h}/{h_kv} {sq}x{sk} d{d} {dtype}"
    if dtype == torch.float64:
        return assert_close64(_named(got), _named(ref), 1e-10, ctx, floor=1.0)
    if bool(keep.any(-1).all()):
        base = pytorch_same_dtype(q, k, v, do, keep)
        assert_relative_rule(_named(got), _named(ref), _named(base), 1e-5 if dtype == torch.float32 else 5e-3, ctx,
                             floor=1.0)
    else:  # rows that keep nothing: PyTorch gives NaN there, so no baseline; ours must be exact zeros
        # floor 1: gradients can be exactly 0 (a single kept key), while inputs are O(1)
        assert_close64(_named(got), _named(ref), 1e-5 if dtype == torch.float32 else 3e-2, ctx, floor=1.0)
        empty = ~keep.any(-1)
        assert (got["out"].masked_select(empty[..., None].expand_as(got["out"])) == 0).all()


def _named(d):  # the clip-loss helpers compare NAMES = ("loss", ...): map onto them
    return {"loss": d["out"], "image": d["dq"], "text": d["dk"], "scale": None, "bias": d["dv"]}


def test_masks_match_the_contract_written_as_loops():
    for kind, p in MASK_CASES + [("spans", {"spans": [(0, 50)]})]:
        for sq, sk in ((50, 50), (13, 50), (50, 50)):
            pp = _params(kind, p, sk)
            want = loop_mask(kind, sq, sk, **pp)
            mask = vlfast_mask(kind, sk, **pp)
            got = torch.ones(1, sq, sk, dtype=torch.bool) if mask is None else mask.to_dense(sq, sk)
            assert torch.equal(got[0], want), (kind, p, sq, sk)


def test_mask_composition_and_key_padding():
    valid = torch.tensor([[True] * 6 + [False] * 2, [False, True] * 4])
    dense = (M.causal() & M.key_padding(valid)).to_dense(8, 8)
    assert torch.equal(dense, loop_mask("causal", 8, 8)[None] & valid[:, None, :])
    assert torch.equal(M.key_padding.from_lengths(torch.tensor([3, 8]), 8).key_valid[0], torch.arange(8) < 3)


@pytest.mark.parametrize("kind,p", MASK_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_reference_every_mask(kind, p, dtype):
    _check(2, 4, 2, 50, 50, 32, dtype, kind, p, "reference")


@pytest.mark.triton
@pytest.mark.parametrize("kind,p", MASK_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_triton_every_mask(kind, p, dtype, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    _check(2, 4, 2, 50, 50, 32, dtype, kind, p, "triton")


@pytest.mark.parametrize("impl", ["reference", TRITON])
@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 3), (2, 1), (113, 203), (128, 217), (203, 113)])
@pytest.mark.parametrize("kind", ["none", "causal"])
def test_length_pairs(impl, sq, sk, kind):
    _check(1, 2, 1, sq, sk, 16, torch.float32, kind, {}, impl)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", TRITON])
@pytest.mark.parametrize("sq,sk", [(1023, 1024), (1024, 1023)])
def test_long_length_pairs(impl, sq, sk):
    _check(1, 1, 1, sq, sk, 16, torch.float32, "causal", {}, impl)


@pytest.mark.parametrize("impl,d", [("reference", d) for d in (32, 72, 80, 96, 104, 128, 256)]
                         + [pytest.param("triton", d, marks=pytest.mark.triton) for d in (72, 104, 256)])
def test_head_dims(impl, d):
    """The interpreter runs the odd head dims; the GPU tests run them all."""
    _check(1, 2, 2, 37, 41, d, torch.float32, "causal", {}, impl)


@pytest.mark.parametrize("impl", ["reference", TRITON])
@pytest.mark.parametrize("ratio", [1, 2, 7, 8])
def test_grouped_query_ratios(impl, ratio):
    _check(1, ratio * 2, 2, 33, 33, 16, torch.float32, "causal", {}, impl)


@pytest.mark.parametrize("impl", ["reference", TRITON])
def test_key_padding_with_fully_masked_rows(impl):
    valid = torch.zeros(2, 40, dtype=torch.bool)
    valid[0, 5:25] = True  # batch 1 has no valid key at all; batch 0's first queries see none (causal)
    _check(2, 2, 2, 40, 40, 16, torch.float32, "causal", {}, impl, keep_extra=valid[:, None, :],
           mask_extra=M.key_padding(valid))


@pytest.mark.parametrize("impl", ["reference", "torch", TRITON])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_inputs_reach_every_row_that_attends_them(impl, where):
    """A NaN in q row 3 (or key 3 of k / v) of head 1 must give NaN in the causal rows that use it, in the
    output and in dq; rows of the other head stay finite (the reference used to zero NaN rows)."""
    q, k, v, do = make_qkv(1, 2, 2, 11, 11, 16, torch.float32)
    dict(q=q, k=k, v=v)[where][0, 1, 3, 2] = float("nan")
    got = run_vlfast(q, k, v, do, M.causal(), impl)
    rows = torch.arange(11)
    uses = rows == 3 if where == "q" else rows >= 3  # causal: rows >= 3 attend key 3
    for name in ("out", "dq"):
        nan_rows = got[name][0, 1].isnan().any(-1)
        assert nan_rows[uses].all(), (name, nan_rows)
        assert torch.isfinite(got[name][0, 0]).all(), name
    if where != "v":  # a NaN value times a zero probability is NaN in a matmul: rows below 3 are unspecified
        assert not got["out"][0, 1].isnan().any(-1)[~uses].any()


@pytest.mark.parametrize("impl", ["reference", "torch", TRITON])
def test_fully_masked_rows_give_zero_even_with_nan_queries(impl):
    q, k, v, do = make_qkv(2, 2, 2, 6, 6, 16, torch.float32)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1] = False  # batch 1 keeps no key
    q[1, 0, 2, :] = float("nan")
    got = run_vlfast(q, k, v, do, M.key_padding(valid), impl)
    assert (got["out"][1] == 0).all() and (got["dq"][1] == 0).all()
    assert torch.isfinite(got["out"][0]).all()


@pytest.mark.parametrize("impl", ["reference", "torch", TRITON])
@pytest.mark.parametrize("kind", ["none", "causal"])
def test_no_keys_at_all_gives_zeros(impl, kind):
    """Sk = 0: every row keeps nothing, so out = 0 and dq = 0 (as a zero-length packed sequence does)."""
    q, k, v, do = make_qkv(2, 4, 2, 5, 0, 16, torch.float32)
    got = run_vlfast(q, k, v, do, M.causal() if kind == "causal" else None, impl)
    assert got["out"].shape == q.shape and (got["out"] == 0).all() and (got["dq"] == 0).all()
    assert got["dk"].shape == k.shape and got["dv"].shape == v.shape


def check_varlen_per_sequence(impl, lq, lk):
    """attention_varlen on packed sequences of query lengths lq / key lengths lk equals float64 attention
    on each sequence alone (out and every gradient), for no mask, causal and spans packed by token."""
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    ids = torch.cat([torch.tensor(span_ids(n, [(1, 3), (n - 4, 3)] if n >= 8 else []), dtype=torch.int32) for n in lk])
    for mask in (None, M.causal(), M.spans(ids)):
        q, k, v, do = (x[0].transpose(0, 1).contiguous() for x in make_qkv(1, 4, 2, int(cu_q[-1]), int(cu_k[-1]),
                                                                             24, torch.float32))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = attention_varlen(*leaves, cu_q, cu_k, max(lq), max(lk), mask=mask, impl=impl)
        out.backward(do)
        for b in range(len(lq)):
            q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
            if q1 == q0:
                continue
            seq = [x[a:c].transpose(0, 1)[None] for x, a, c in ((q, q0, q1), (k, k0, k1), (v, k0, k1), (do, q0, q1))]
            kind = "none" if mask is None else "causal" if mask.span_ids is None else "spans"
            keep = loop_mask(kind, q1 - q0, k1 - k0, ids=ids[k0:k1].tolist())[None, None]
            ref = reference64(*seq, keep)
            got = {"out": out[q0:q1], "dq": leaves[0].grad[q0:q1], "dk": leaves[1].grad[k0:k1],
                   "dv": leaves[2].grad[k0:k1]}
            for name in NAMES:
                g = got[name].double().transpose(0, 1)[None]
                torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-5, msg=f"{impl} seq {b} {name}")


@pytest.mark.parametrize("impl", ["reference", TRITON])
def test_varlen_matches_per_sequence_attention(impl):
    """Zero-length and length-1 sequences, query and key lengths that differ, GQA, spans packed by token."""
    check_varlen_per_sequence(impl, [5, 0, 1, 40, 33, 7], [5, 0, 1, 40, 33, 12])


@pytest.mark.parametrize("impl", ["reference", TRITON])
def test_backward_is_bitwise_repeatable(impl):
    q, k, v, do = make_qkv(2, 4, 2, 45, 45, 32, torch.float32)
    mask = M.image_prefix(13, 45)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attention(*leaves, mask=mask, impl=impl).backward(do)
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_dalle_column_layers_run_column_major_and_visit_as_few_tiles_as_row_layers():
    """The column mask keeps as many pairs as the row mask; in column-major order it also visits as
    few (query, key) tiles, where row-major order visits every key tile of the image."""
    from vlfast.ops.attention import blocks
    from vlfast.ops.attention.triton import column_major_order
    s = 64 + 16 * 16
    column, row = M.dalle(64, 16, 16, "column"), M.dalle(64, 16, 16, "row")
    order = column_major_order(column, s, s, "cpu")
    assert order is not None and torch.equal(order.sort().values, torch.arange(s))
    assert column_major_order(row, s, s, "cpu") is None and column_major_order(column, s - 1, s, "cpu") is None
    visited = {name: float((blocks._status(m, s, s, 64, 32, "cpu", positions=p) != 0).float().mean())
               for name, m, p in (("row", row, None), ("column", column, None), ("column-major", column, order))}
    assert visited["column-major"] == visited["row"] <= 0.6 * visited["column"]


@pytest.mark.parametrize("impl", ["torch", TRITON])
def test_non_contiguous_layouts(impl):
    """(B, S, H, D) tensors viewed as (B, H, S, D), as projections produce them (strided, not copied by the
    test), through impl against the float64 reference, output and every gradient."""
    q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in make_qkv(2, 4, 2, 30, 30, 16, torch.float32))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    mask = M.causal()
    got = run_vlfast(q, k, v, do, mask, impl)
    ref = reference64(q, k, v, do, mask.to_dense(30, 30)[:, None])
    for name in ref:
        torch.testing.assert_close(got[name].double(), ref[name], rtol=2e-5, atol=2e-5, msg=lambda m: f"{name}: {m}")


# --- bad input ---------------------------------------------------------------------------------------

def _qkv(b=2, h=4, hk=2, s=8, d=16):
    return torch.randn(b, h, s, d), torch.randn(b, hk, s, d), torch.randn(b, hk, s, d)


@pytest.mark.parametrize("make,kwargs,exc,match", [
    (lambda: (torch.randn(2, 8, 16),) + _qkv()[1:], {}, ValueError, "q must be 4-D"),
    (lambda: (_qkv()[0], torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)), {}, ValueError, "multiple of"),
    (lambda: (_qkv()[0], _qkv()[1], torch.randn(2, 2, 9, 16)), {}, ValueError, "same shape"),
    (lambda: (_qkv()[0].double(),) + _qkv()[1:], {}, TypeError, "share a dtype"),
    (lambda: (_qkv()[0], torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8)), {}, ValueError, "head_dim"),
    (lambda: (_qkv()[0], torch.randn(3, 2, 8, 16), torch.randn(3, 2, 8, 16)), {}, ValueError, "batch"),
    (lambda: _qkv(), {"mask": "causal"}, TypeError, "vlfast.masks.Mask"),
    (lambda: _qkv(), {"mask": M.key_padding(torch.ones(3, 8, dtype=torch.bool))}, ValueError, r"key_padding must be \(2, 8\)"),
    (lambda: _qkv(), {"mask": M.spans(torch.zeros(9, dtype=torch.int32))}, ValueError, "span ids"),
    (lambda: _qkv(), {"mask": M.dalle(2, 2, 2, "row")}, ValueError, "covers 2 \\+ 2 x 2 tokens"),
    (lambda: _qkv(), {"scale": float("nan")}, ValueError, "scale must be"),
    (lambda: _qkv(), {"impl": "cuda"}, vlfast.ImplUnavailableError, "no CUDA C\\+\\+ kernel"),
    (lambda: tuple(x.double() for x in _qkv()), {"impl": "triton"}, vlfast.ImplUnavailableError, "float64"),
])
def test_bad_input_gets_a_clear_error(make, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        attention(*make(), **kwargs)


def test_bad_varlen_input_gets_a_clear_error():
    q, k = torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = [
        (torch.tensor([0, 4, 9], dtype=torch.int32), good, 6, 6, "end at the 10 packed tokens"),
        (torch.tensor([0, 6, 4, 10], dtype=torch.int32), torch.tensor([0, 3, 6, 10], dtype=torch.int32), 6, 6,
         "never decrease"),
        (good, torch.tensor([0, 10], dtype=torch.int32), 6, 10, "batch \\+ 1"),
        (good, good, 5, 6, "longer than max_seqlen 5"),
        (good.float(), good, 6, 6, "1-D int32"),
    ]
    for cu_q, cu_k, mq, mk, match in cases:
        with pytest.raises(ValueError, match=match):
            attention_varlen(q, k, k, cu_q, cu_k, mq, mk)
    with pytest.raises(ValueError, match="key_padding does not apply"):
        attention_varlen(q, k, k, good, good, 6, 6, mask=M.key_padding(torch.ones(2, 6, dtype=torch.bool)))


def test_equal_mask_parts_combine_and_different_ones_are_refused():
    row = M.dalle(4, 3, 5, "row")
    both = row & M.dalle(4, 3, 5, "row")  # equal parts: the combination is the same mask
    assert torch.equal(both.to_dense(19, 19), row.to_dense(19, 19))
    assert torch.equal((M.sliding_window(3) & M.sliding_window(3)).to_dense(9, 9), M.sliding_window(3).to_dense(9, 9))
    with pytest.raises(ValueError, match="both masks set dalle, with different values"):
        row & M.dalle(4, 3, 5, "column")
    with pytest.raises(ValueError, match="both masks set window, with different values"):
        M.sliding_window(3) & M.sliding_window(4)


def test_window_without_causal_is_refused():
    """The window counts back from the query (i - j < w): without causal it would keep every later key."""
    with pytest.raises(ValueError, match="window needs causal=True"):
        M.Mask(window=3)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        M.Mask(causal=True, window=0)
    assert torch.equal(M.Mask(causal=True, window=3).to_dense(7, 7), M.sliding_window(3).to_dense(7, 7))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: M.image_prefix(9, 8), ValueError, "num_image_tokens must be an int in \\[0, seq_len=8\\], got 9"),
    (lambda: M.image_prefix(-1, 8), ValueError, "num_image_tokens must be"),
    (lambda: M.image_prefix(2.0, 8), ValueError, "num_image_tokens must be"),
    (lambda: M.image_prefix(2, -1), ValueError, "seq_len must be an int >= 0"),
    (lambda: M.key_padding.from_lengths(torch.tensor([3.0, 8.0]), 8), TypeError, "lengths must be an integer"),
    (lambda: M.key_padding.from_lengths(torch.tensor([3, 9]), 8), ValueError, "lengths must be in \\[0, 8\\]"),
    (lambda: M.key_padding.from_lengths(torch.tensor([-1, 2]), 8), ValueError, "lengths must be in \\[0, 8\\]"),
    (lambda: M.key_padding.from_lengths(torch.tensor([[3]]), 8), TypeError, "lengths must be an integer"),
    (lambda: M.key_padding.from_lengths(torch.tensor([3]), 8.0), ValueError, "sk must be an int >= 0"),
])
def test_bad_mask_constructor_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_image_prefix_of_the_whole_sequence_and_from_lengths_of_zero_and_full():
    assert torch.equal(M.image_prefix(8, 8).to_dense(8, 8)[0], torch.ones(8, 8, dtype=torch.bool))
    valid = M.key_padding.from_lengths(torch.tensor([0, 8], dtype=torch.int32), 8).key_valid
    assert not valid[0].any() and valid[1].all()


def test_varlen_dalle_grid_smaller_than_a_sequence_is_refused():
    q = torch.randn(20, 2, 16)
    cu = torch.tensor([0, 6, 20], dtype=torch.int32)  # the second sequence has 14 tokens
    with pytest.raises(ValueError, match="covers 4 \\+ 3 x 3 tokens but a sequence has 14 keys"):
        attention_varlen(q, q, q, cu, cu, 14, 14, mask=M.dalle(4, 3, 3, "row"))
    attention_varlen(q, q, q, cu, cu, 20, 20, mask=M.dalle(4, 2, 5, "row"))  # 14 tokens fit; a loose max is fine


def test_bad_masks_get_a_clear_error():
    for make, match in ((lambda: M.sliding_window(0), "window must be"), (lambda: M.dalle(4, 2, 2, "diag"), "kind"),
                        (lambda: M.spans(torch.zeros(3)), "integer tensor"),
                        (lambda: M.key_padding(torch.ones(2, 3)), "bool")):
        with pytest.raises(ValueError, match=match):
            make()


# --- the torch.library boundary ----------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["reference", TRITON])
def test_opcheck(impl):
    q, k, v = (x.requires_grad_() for x in _qkv(s=20))
    ids = torch.tensor(span_ids(20, [(2, 5)]), dtype=torch.int32)
    args = (q, k, v, None, None, 20, 20, True, 0, ids, [0, 0, 0, 0, 0], None, 0.25, impl)
    torch.library.opcheck(attention_forward, args)
    out, lse2 = attention_forward(*args)
    torch.library.opcheck(attention_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                               out.detach(), lse2.detach(), None, None, 20, 20, True, 0, ids,
                                               [0, 0, 0, 0, 0], None, 0.25, impl))


@pytest.mark.parametrize("impl", ["reference", TRITON])
def test_compile_fullgraph_forward_and_backward(impl):
    torch._dynamo.reset()
    mask = M.image_prefix(7, 24)

    def step(q, k, v):
        return attention(q * 1.5, k, v, mask=mask, impl=impl).square().sum()

    q, k, v = (x.requires_grad_() for x in _qkv(s=24))
    out = torch.compile(step, fullgraph=True)(q, k, v)
    out.backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    want = step(q, k, v)
    want.backward()
    torch.testing.assert_close(out, want)
    for g, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad)
