"""The Triton attention kernels on a GPU at real sizes (run by benchmarks/gpu_check.sh)."""
import pytest
import torch

import vlfast.masks as M
from vlfast.ops.attention import attention, attention_varlen

from .attention_cases import loop_mask, make_qkv, pytorch_same_dtype, reference64, run_vlfast, span_ids, vlfast_mask
from .clip_loss_cases import assert_relative_rule

pytestmark = pytest.mark.gpu
TOL = {torch.float16: 5e-3, torch.bfloat16: 5e-3, torch.float32: 1e-5}


def _named(d):
    return {"loss": d["out"], "image": d["dq"], "text": d["dk"], "scale": None, "bias": d["dv"]}


def _check(b, h, h_kv, sq, sk, d, dtype, kind, p):
    if kind == "spans":
        p = {"ids": span_ids(sk, p["spans"])}
    keep = loop_mask(kind, sq, sk, **p)[None, None].cuda()
    mask = vlfast_mask(kind, sk, **p)
    mask = mask.to("cuda") if mask is not None else None
    q, k, v, do = make_qkv(b, h, h_kv, sq, sk, d, dtype, "cuda")
    ref = reference64(q, k, v, do, keep)
    got = run_vlfast(q, k, v, do, mask, "triton")
    base = pytorch_same_dtype(q, k, v, do, keep)
    assert_relative_rule(_named(got), _named(ref), _named(base), TOL[dtype], f"{kind} {sq}x{sk} d{d} {dtype}",
                         floor=1.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [32, 64, 72, 80, 96, 104, 128, 256])
def test_head_dims(d, dtype):
    _check(2, 4, 2, 300, 300, d, dtype, "causal", {})


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 3), (2, 1), (113, 203), (128, 217), (1023, 1024), (1024, 1023)])
@pytest.mark.parametrize("kind", ["none", "causal"])
def test_length_pairs(sq, sk, kind):
    if kind == "causal" and sq > sk:
        pytest.skip("leading queries keep nothing: covered by the CPU tests, PyTorch gives NaN there")
    _check(1, 4, 4, sq, sk, 64, torch.bfloat16, kind, {})


@pytest.mark.parametrize("kind,p", [
    ("window", {"window": 100}),
    ("spans", {"spans": [(0, 576)]}),
    ("spans", {"spans": [(3, 40), (300, 77), (900, 123)]}),
    ("dalle-row", {"text_len": 256, "rows": 32, "cols": 32}),
    ("dalle-column", {"text_len": 256, "rows": 32, "cols": 32}),
    ("dalle-conv", {"text_len": 256, "rows": 32, "cols": 32, "kernel": 11}),
], ids=str)
def test_every_mask(kind, p):
    s = 1280 if kind.startswith("dalle") else 1024
    _check(2, 8, 4, s, s, 64, torch.bfloat16, kind, p)


@pytest.mark.parametrize("ratio", [1, 2, 7, 8])
def test_grouped_query_ratios(ratio):
    _check(1, 2 * ratio, 2, 257, 257, 128, torch.bfloat16, "causal", {})


def test_backward_is_bitwise_deterministic():
    q, k, v, do = make_qkv(2, 8, 2, 1000, 1000, 128, torch.bfloat16, "cuda")
    mask = M.image_prefix(576, 1000, device="cuda")
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        attention(*leaves, mask=mask).backward(do)
        grads.append([x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_clip_text_varlen_matches_padded_dense():
    """CLIP's text tower: 1024 captions of 5..77 tokens, causal, packed vs padded with key padding."""
    torch.manual_seed(0)
    lengths = torch.randint(5, 78, (1024,), device="cuda")
    cu = torch.cat([torch.zeros(1, device="cuda", dtype=torch.long), lengths.cumsum(0)]).int()
    total = int(cu[-1])
    q, k, v = (torch.randn(total, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    packed = attention_varlen(q, k, v, cu, cu, 77, 77, mask=M.causal())
    pad = torch.zeros(1024, 8, 77, 64, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(77, device="cuda")
    valid = pos[None, :] < lengths[:, None]
    index = (cu[:-1, None] + pos[None, :]).clamp(max=total - 1).long()

    def padded(x):
        out = x[index].transpose(1, 2).clone()  # (B, H, 77, D)
        return torch.where(valid[:, None, :, None], out, pad)

    dense = attention(padded(q), padded(k), padded(v), mask=M.causal() & M.key_padding(valid))
    torch.testing.assert_close(dense.transpose(1, 2)[valid], packed)


@pytest.mark.parametrize("d,kind,p", [(72, "causal", {}), (128, "causal", {}),
                                      (256, "spans", {"spans": [(5, 300), (700, 211)]}),
                                      (64, "dalle-column", {"text_len": 256, "rows": 32, "cols": 32})])
def test_tma_candidates(d, kind, p):
    """Each pass's TMA candidates (host-side descriptors on this GPU's triton) and its default,
    against float64 at real tiles."""
    from vlfast.ops.attention import triton as K
    from vlfast.ops.attention import tuning
    s = 256 + 32 * 32 if kind.startswith("dalle") else 1111
    if kind == "spans":
        p = {"ids": span_ids(s, p["spans"])}
    keep = loop_mask(kind, s, s, **p)[None, None].cuda()
    mask = vlfast_mask(kind, s, **p)
    mask = mask.to("cuda") if mask is not None else None
    q, k, v, do = make_qkv(1, 4, 2, s, s, d, torch.bfloat16, "cuda")
    ref, base = reference64(q, k, v, do, keep), pytorch_same_dtype(q, k, v, do, keep)
    problem = K.Problem(q, k, v, None, None, s, s, mask, d ** -0.5)
    assert problem.tma_ok == (torch.cuda.get_device_capability()[0] >= 9)
    fwd = tuning.candidates(d, torch.bfloat16, "fwd")
    for config in [fwd[0]] + [c for c in fwd if c.tma]:
        out, lse2 = K.forward(problem, config)
        got = {"out": out.double(), "dq": None, "dk": None, "dv": None}
        assert_relative_rule(_named(got), _named({**got, "out": ref["out"]}), _named({**got, "out": base["out"]}),
                             TOL[torch.bfloat16], f"{kind} d{d} fwd {config}", floor=1.0)
    out, lse2 = K.forward(problem, fwd[0])
    bwd = tuning.candidates(d, torch.bfloat16, "bwd")
    for config in [bwd[0]] + [c for c in bwd if c.tma]:
        dq, dk, dv = K.backward(problem, do, out, lse2, config)
        got = {"out": None, "dq": dq.double(), "dk": dk.double(), "dv": dv.double()}
        assert_relative_rule(_named(got), _named({**ref, "out": None}), _named({**base, "out": None}),
                             TOL[torch.bfloat16], f"{kind} d{d} bwd {config}", floor=1.0)
