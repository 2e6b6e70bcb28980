"""impl="torch" (PyTorch's CPU flash kernel over the mask's tiles) against float64 with explicit dense masks."""
import pytest
import torch

import vlfast.masks as M
from vlfast.ops.attention import attention, attention_backward, attention_forward, attention_varlen
from vlfast.ops.attention import torch_impl

from .attention_cases import make_qkv, run_vlfast, span_ids
from .test_attention import MASK_CASES, NAMES, _check, check_varlen_per_sequence

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.fixture(params=["dense", "tiled"])
def plan(request, monkeypatch):
    """Small masks run as one call with a dense mask; "tiled" forces the tiled plans at any size."""
    torch_impl._PLANS.clear()
    if request.param == "tiled":
        monkeypatch.setattr(torch_impl, "DENSE_MAX_PAIRS", 0)
    yield request.param
    torch_impl._PLANS.clear()


@pytest.mark.parametrize("kind,p", MASK_CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_mask(kind, p, dtype, plan):
    _check(2, 4, 2, 50, 50, 32, dtype, kind, p, "torch")


@pytest.mark.parametrize("kind,p", [
    ("dalle-row", {"text_len": 7, "rows": 10, "cols": 13}),     # row / column layers take the grid plan
    ("dalle-column", {"text_len": 7, "rows": 10, "cols": 13}),
    ("dalle-row", {"text_len": 0, "rows": 9, "cols": 11}),      # no text
    ("dalle-conv", {"text_len": 7, "rows": 10, "cols": 13, "kernel": 5}),
    ("spans", {"spans": [(0, 144)]}),                           # several blocks of 128: whole and partial tiles
    ("window", {"window": 150}),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_masks_over_several_blocks(kind, p, dtype, plan):
    s = p["text_len"] + p["rows"] * p["cols"] if kind.startswith("dalle") else 137
    _check(1, 2, 1, s, s, 72, dtype, kind, p, "torch")


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 3), (2, 1), (97, 130), (130, 97), (130, 300), (300, 130)])
@pytest.mark.parametrize("kind", ["none", "causal"])
def test_length_pairs(sq, sk, kind, plan):
    """Causal masks are bottom-right aligned; with Sq > Sk the first queries keep nothing."""
    _check(1, 2, 1, sq, sk, 16, torch.float32, kind, {}, "torch")


@pytest.mark.parametrize("sq,sk,kind", [(97, 97, "causal"), (130, 97, "causal"), (97, 130, "spans")])
def test_length_pairs_bfloat16(sq, sk, kind, plan):
    p = {"spans": [(40, 50)]} if kind == "spans" else {}
    _check(2, 2, 1, sq, sk, 80, torch.bfloat16, kind, p, "torch")


@pytest.mark.parametrize("d", [72, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_head_dims(d, dtype):
    _check(1, 2, 2, 37, 41, d, dtype, "causal", {}, "torch")


@pytest.mark.parametrize("ratio", [2, 7])
@pytest.mark.parametrize("kind,p", [("causal", {}), ("dalle-column", {"text_len": 5, "rows": 4, "cols": 6})],
                         ids=str)
def test_grouped_query(ratio, kind, p, plan):
    _check(2, ratio * 2, 2, 29, 29, 16, torch.float32, kind, p, "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_padding_with_fully_masked_rows(dtype, plan):
    """Rows that keep nothing give exact zeros and zero gradients (checked inside _check)."""
    valid = torch.zeros(2, 140, dtype=torch.bool)
    valid[0, 5:25] = True
    valid[0, 131:] = True  # batch 1 has no valid key at all; batch 0's first queries see none (causal)
    _check(2, 2, 2, 140, 140, 16, dtype, "causal", {}, "torch", keep_extra=valid[:, None, :],
           mask_extra=M.key_padding(valid))


def test_fully_masked_rows_give_zero_gradients(plan):
    valid = torch.zeros(1, 30, dtype=torch.bool)
    valid[0, 10:] = True
    q, k, v, do = make_qkv(1, 2, 2, 30, 30, 16, torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, mask=M.causal() & M.key_padding(valid), impl="torch")
    out.backward(do)
    assert (out[:, :, :10] == 0).all() and not out.isnan().any()
    assert (leaves[0].grad[:, :, :10] == 0).all() and (leaves[1].grad[:, :, :10] == 0).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_inputs_propagate(where, dtype):
    """The CPU kernel drops NaN scores in float32 / bfloat16 (a NaN in q or k gives finite outputs);
    ours must give NaN where the spec (the float64 reference) does, in outputs and gradients."""
    q, k, v, do = make_qkv(1, 2, 2, 20, 20, 16, dtype)
    dict(q=q, k=k, v=v)[where][0, 1, 3, 2] = float("nan")
    got, want = ({name: x.isnan() for name, x in run_vlfast(q.to(t), k.to(t), v.to(t), do.to(t), M.causal(),
                                                              impl).items()}
                 for t, impl in ((dtype, "torch"), (torch.float64, "reference")))
    for name in NAMES:
        assert torch.equal(got[name], want[name]), name


def test_varlen_matches_per_sequence_attention(plan):
    """Zero-length and length-1 sequences, query and key lengths that differ, GQA, spans packed by token."""
    check_varlen_per_sequence("torch", [5, 0, 1, 40, 33, 7, 3], [5, 0, 1, 40, 33, 12, 0])


@pytest.mark.parametrize("lengths", [[5, 7, 1, 6, 0, 4], [9, 9], [3, 8, 8, 2, 7]])
def test_packed_self_attention_runs_padded_in_one_call(plan, lengths, monkeypatch):
    """Packed sequences with the same query and key lengths, no mask or causal, and little padding run as
    one padded batch (torch_impl._padding): out and every gradient against float64 per sequence, a
    zero-length sequence included; the padded layout is really taken for those masks."""
    taken = []
    padding = torch_impl._padding
    monkeypatch.setattr(torch_impl, "_padding", lambda *a: taken.append(padding(*a)) or taken[-1])
    check_varlen_per_sequence("torch", lengths, lengths)
    assert sum(x is not None for x in taken) == 4  # none and causal, forward and backward; spans run per sequence


def test_block_sparse_masks_skip_tiles():
    """Past DENSE_MAX_PAIRS, DALL-E row / column layers and an image prefix run few more (query, key)
    pairs than the mask keeps (counting is_causal tiles as half)."""
    s = 256 + 32 * 32
    for mask in (M.dalle(256, 32, 32, "row"), M.dalle(256, 32, 32, "column"), M.image_prefix(576, 1024)):
        n = 1024 if mask.span_ids is not None else s
        assert n * n > torch_impl.DENSE_MAX_PAIRS  # float32: bfloat16 runs masks other than DALL-E's dense
        plan = torch_impl._plan(mask, n, n, torch.float32, torch.device("cpu"))
        pairs = 0
        for tile in plan.tiles:
            rows = tile.q.stop - tile.q.start
            keys = tile.k.cols if tile.k.cols else tile.k.stop - tile.k.start
            pairs += rows * keys / (2 if tile.causal else 1)
        kept = int(mask.to_dense(n, n).sum())
        assert pairs < min(1.1 * kept, 0.75 * n * n), (mask, pairs / kept)


def test_auto_on_cpu_runs_torch(monkeypatch):
    calls = []
    real = torch_impl.forward
    monkeypatch.setattr(torch_impl, "forward", lambda *a: calls.append(1) or real(*a))
    monkeypatch.delenv("VLFAST_IMPL", raising=False)
    q, k, v, _ = make_qkv(1, 2, 2, 9, 9, 16, torch.float32)
    attention(q, k, v, mask=M.causal())
    assert calls


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_compile_fullgraph_forward_and_backward(layout):
    """Outputs and gradients keep the layouts the op's fake kernels promise: (B, S, H, D) tensors viewed
    as (B, H, S, D), as projections give them, included."""
    torch._dynamo.reset()
    mask = M.image_prefix(7, 24)

    def step(q, k, v):
        if layout == "bshd":
            q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return attention(q * 1.5, k, v, mask=mask, impl="torch").square().sum()

    shape = (lambda h: (2, 24, h, 16)) if layout == "bshd" else (lambda h: (2, h, 24, 16))
    q, k, v = (torch.randn(*shape(h), requires_grad=True) for h in (4, 2, 2))
    # no compile caches: their keys do not cover a custom op's fake kernel, so a graph cached before
    # a fake's layouts changed would be reused and fail its stride asserts
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
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


@pytest.mark.parametrize("mask_args", [(True, 0, "spans", [0, 0, 0, 0, 0]), (True, 0, None, [0, 0, 0, 0, 0]),
                                       (True, 0, None, [4, 4, 4, 1, 0])], ids=["spans", "causal", "dalle-row"])
def test_opcheck(mask_args, plan):
    q, k, v = torch.randn(2, 4, 20, 16), torch.randn(2, 2, 20, 16), torch.randn(2, 2, 20, 16)
    causal, window, ids, dalle = mask_args
    ids = torch.tensor(span_ids(20, [(2, 5)]), dtype=torch.int32) if ids else None
    args = (q, k, v, None, None, 20, 20, causal, window, ids, dalle, None, 0.25, "torch")
    torch.library.opcheck(attention_forward, args)
    out, lse2 = attention_forward(*args)
    torch.library.opcheck(attention_backward, (torch.randn_like(out), q, k, v, out, lse2) + args[3:])


def test_bad_input_gets_the_same_clear_errors():
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    for args, kwargs, exc, match in [((q, k, torch.randn(2, 2, 9, 16)), {}, ValueError, "same shape"),
                                     ((q, k, k), {"mask": M.dalle(2, 2, 2, "row")}, ValueError, "covers 2"),
                                     ((q, k.double(), k.double()), {}, TypeError, "share a dtype")]:
        with pytest.raises(exc, match=match):
            attention(*args, impl="torch", **kwargs)
    good = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="longer than max_seqlen 3"):
        attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), k[0].transpose(0, 1), good, good, 3, 4,
                         impl="torch")


# --- per-call cost: the kernel's own layouts, no op boundary in eager calls, a guard without regions ----

@pytest.mark.parametrize("h_kv", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_gradients_come_in_the_kernels_layout(h_kv, layout):
    """dq, dk, dv are (B, S, H, D) in memory, as the CPU kernel (and SDPA) gives them, for any input
    layout; autograd's expanded upstream gradient (of out.sum()) is taken as it is. Values against
    float64."""
    q, k, v, _ = make_qkv(2, 4, h_kv, 37, 37, 24, torch.float32)
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grads = torch.autograd.grad(attention(*leaves, mask=M.causal(), impl="torch").sum(), leaves)
    leaves64 = [x.double().requires_grad_() for x in (q, k, v)]
    want = torch.autograd.grad(attention(*leaves64, mask=M.causal(), impl="reference").sum(), leaves64)
    for g, w, x in zip(grads, want, (q, k, v)):
        assert g.stride() == torch.empty_permuted(x.shape, (0, 2, 1, 3)).stride()
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5)
    dq, dk, dv = attention_backward(torch.ones(1).expand(q.shape), q, k, v, *attention_forward(
        q, k, v, None, None, 37, 37, True, 0, None, [0] * 5, None, 24 ** -0.5, "torch"), None, None, 37, 37, True, 0,
        None, [0] * 5, None, 24 ** -0.5, "torch")
    assert dk.stride() == torch.empty_permuted(k.shape, (0, 2, 1, 3)).stride()  # the op itself, as its fake says


def test_eager_calls_skip_the_op_boundary():
    """Plain eager calls run the ops' bodies without the torch.library dispatch (tens of microseconds a
    call); under a dispatch mode (fake tensors here) the public function still goes through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    with torch.profiler.profile() as prof:
        attention(q, k, v, mask=M.causal(), impl="torch").sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert not any(n.startswith("vlfast::") for n in names), sorted(n for n in names if "vlfast" in n)
    with FakeTensorMode():
        fq, fk, fv = (torch.empty(1, 2, 16, 8) for _ in range(3))
        out = attention(fq, fk, fv, mask=M.causal(), impl="torch")  # the body would need real data
    assert out.shape == (1, 2, 16, 8)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("layout", ["contiguous", "bshd", "sliced"])
@pytest.mark.parametrize("where", ["q", "k", "v", "do"])
def test_non_finite_values_in_any_layout_take_the_reference(bad, layout, where):
    """The finiteness guard reads every element whatever the layout (sums of the dense elements,
    expanded and strided tensors): NaN / inf anywhere gives the NaN pattern of the float64 reference."""
    q, k, v, do = make_qkv(1, 2, 2, 21, 21, 16, torch.float32)
    if layout == "bshd":
        q, k, v, do = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v, do))
    if layout == "sliced":
        q, k, v, do = (torch.cat([x, x], dim=-1)[..., 16:] for x in (q, k, v, do))
    dict(q=q, k=k, v=v, do=do)[where][0, 1, 17, 5] = bad
    got, want = ({name: x.isnan() for name, x in run_vlfast(q.to(t), k.to(t), v.to(t), do.to(t), M.causal(),
                                                              impl).items()}
                 for t, impl in ((torch.float32, "torch"), (torch.float64, "reference")))
    for name in NAMES:
        assert torch.equal(got[name], want[name]), name


def test_expanded_upstream_gradient_with_a_non_finite_value():
    """do = one NaN broadcast everywhere (a stride-0 tensor): every gradient is NaN, as in the reference."""
    q, k, v = (torch.randn(1, 2, 9, 8, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, mask=M.causal(), impl="torch")
    grads = torch.autograd.grad(out, (q, k, v), torch.full((1,), float("nan")).expand(out.shape))
    assert all(g.isnan().all() for g in grads)


def test_backward_after_a_finite_forward_checks_only_the_upstream_gradient(monkeypatch):
    """The forward's finiteness check of q, k, v travels to the backward of the same autograd node, which
    then reads only do (autograd's saved tensors cannot change in between); a NaN there still gives the
    reference's NaN pattern. Through the op (no forward verdict) the backward checks all five."""
    checked = []
    finite = torch_impl._finite
    monkeypatch.setattr(torch_impl, "_finite", lambda *xs: checked.append(len(xs)) or finite(*xs))
    q, k, v, do = make_qkv(1, 2, 2, 21, 21, 16, torch.float32)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    torch.autograd.grad(attention(*leaves, mask=M.causal(), impl="torch"), leaves, do)
    assert checked == [3, 1]
    checked.clear()
    out, lse2 = attention_forward(q, k, v, None, None, 21, 21, True, 0, None, [0] * 5, None, 0.25, "torch")
    attention_backward(do, q, k, v, out, lse2, None, None, 21, 21, True, 0, None, [0] * 5, None, 0.25, "torch")
    assert checked == [3, 5]
    do[0, 1, 17, 5] = float("nan")
    got, want = ({name: x.isnan() for name, x in run_vlfast(q.to(t), k.to(t), v.to(t), do.to(t), M.causal(),
                                                              impl).items()}
                 for t, impl in ((torch.float32, "torch"), (torch.float64, "reference")))
    for name in NAMES:
        assert torch.equal(got[name], want[name]), name


def test_elements_reads_each_distinct_element_once():
    """The guard's 1-D view of a tensor's elements: dense layouts in any order, broadcast dimensions
    dropped, a storage offset kept; gaps and overlaps give None (summed by PyTorch instead)."""
    x = torch.randn(3, 4, 5)
    cases = {
        "contiguous": (x, 60), "permuted": (x.permute(2, 0, 1), 60), "offset": (torch.randn(2, 3, 4, 5)[1], 60),
        "expanded": (torch.randn(1, 4, 1).expand(3, 4, 5), 4), "scalar expanded": (torch.randn(1).expand(3, 4), 1),
    }
    for name, (t, count) in cases.items():
        flat = torch_impl._elements(t)
        assert flat is not None and flat.shape == (count,), name
        assert torch.equal(flat.sort().values, t.unique().sort().values), name
    assert torch_impl._elements(x[:, :, 1:]) is None                        # gaps
    assert torch_impl._elements(x.view(-1).as_strided((3, 4), (2, 1))) is None  # overlapping


def _fused_qkv(b: int, s: int, h: int, d: int, dtype=torch.float32):
    """q, k, v (B, H, S, D) as vlfast.nn.SelfAttention makes them: views split from one projection."""
    qkv = torch.randn(b, s, 3 * h * d, dtype=dtype)
    return qkv, tuple(t.view(b, s, h, d).transpose(1, 2) for t in qkv.split([h * d] * 3, dim=-1))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_views_of_one_projection_are_checked_in_one_pass(bad, where):
    """q, k and v split from one fused projection: the guard reads the projection once (each view alone
    has gaps); a bad value in any of the three is still found, and the call gives the reference's NaN
    pattern. Views that do not make up their base together are read one by one."""
    qkv, (q, k, v) = _fused_qkv(2, 19, 3, 8)
    assert torch_impl._one_base((q, k, v))[0] is qkv and torch_impl._finite(q, k, v)
    assert torch_impl._one_base((q, k)) is None and torch_impl._one_base((q,)) is None
    dict(q=q, k=k, v=v)[where][1, 2, 11, 5] = bad
    assert not torch_impl._finite(q, k, v)
    with torch.no_grad():
        got = attention(q, k, v, mask=M.causal(), impl="torch")
        want = attention(q.double(), k.double(), v.double(), mask=M.causal(), impl="reference")
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()


def test_finite_inputs_whose_squares_overflow_still_match_the_reference():
    """The guard sums squares: float32 values near 1e20 overflow it although they are finite. Such a call
    takes the reference, whose answer (finite here) is the spec."""
    q, k, v, do = make_qkv(1, 2, 2, 21, 21, 16, torch.float32)
    v[0, 1, 4] = 3e19
    assert not torch_impl._finite(v)
    got, want = (run_vlfast(q.to(t), k.to(t), v.to(t), do.to(t), M.causal(), impl)
                 for t, impl in ((torch.float32, "torch"), (torch.float64, "reference")))
    for name in NAMES:
        assert torch.isfinite(got[name]).all(), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5 * want[name].abs().max().item())


@pytest.mark.parametrize("kind,p", [("causal", {}), ("key-padding", {}), ("dalle-row", {"text_len": 3, "rows": 4,
                                                                                       "cols": 5})], ids=str)
@pytest.mark.parametrize("finite", [True, False], ids=["finite", "nan-do"])
def test_natural_lse_gives_what_base2_gives(kind, p, finite, plan):
    """The autograd node keeps the kernel's natural lse (lse_units="natural"), the op returns lse2: both
    forwards agree (empty rows +inf in both) and so do both backwards, the reference's included (a NaN
    in do sends the backward there)."""
    q, k, v, do = make_qkv(2, 2, 1, 23, 23, 16, torch.float32)
    if kind == "dalle-row":
        mask = M.dalle(kind="row", **p)
    elif kind == "key-padding":  # batch 0 keeps no key: empty rows
        mask = M.key_padding(torch.arange(23)[None].expand(2, 23) < torch.tensor([[0], [17]]))
    else:
        mask = M.causal()
    if not finite:
        do[1, 0, 20, 3] = float("nan")
    out2, lse2 = torch_impl.forward(q, k, v, mask, 0.25, lse_units="base2")
    out_e, lse_e = torch_impl.forward(q, k, v, mask, 0.25, lse_units="natural")
    assert torch.equal(out2, out_e)
    torch.testing.assert_close(lse_e * torch_impl.LOG2E, lse2, rtol=1e-6, atol=0)
    assert torch.equal(torch.isposinf(lse_e), torch.isposinf(lse2))
    grads2 = torch_impl.backward(do, q, k, v, out2, lse2, mask, 0.25)
    grads_e = torch_impl.backward(do, q, k, v, out_e, lse_e, mask, 0.25, lse_units="natural")
    for a, b in zip(grads2, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, equal_nan=True)
