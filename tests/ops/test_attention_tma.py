"""The attention kernels' TMA variants (tuning.Config.tma: the tiles each loop loads come through
host-side tensor descriptors) in Triton's interpreter: the same results as plain loads, bit for bit,
and float64's within the rule; calls that TMA cannot serve run with plain loads."""
import pytest
import torch

from vlfast.ops.attention import triton as K
from vlfast.ops.attention import tuning

from .attention_cases import loop_mask, make_qkv, pytorch_same_dtype, reference64, span_ids, vlfast_mask
from .clip_loss_cases import assert_relative_rule

pytestmark = pytest.mark.triton


def _case(kind, b, h, h_kv, sq, sk, d, **p):
    q, k, v, do = make_qkv(b, h, h_kv, sq, sk, d, torch.float16)
    keep = None if kind == "none" else loop_mask(kind, sq, sk, **p)[None, None]
    return q, k, v, do, vlfast_mask(kind, sk, **p), keep


CASES = {
    "spans-gqa-d72": ("spans", 1, 4, 2, 150, 150, 72, {"ids": span_ids(150, [(3, 40), (97, 21)])}),
    "causal-sq<sk-d64": ("causal", 2, 2, 1, 113, 203, 64, {}),
    "dalle-column-d32": ("dalle-column", 1, 2, 2, 8 + 6 * 7, 8 + 6 * 7, 32, {"text_len": 8, "rows": 6, "cols": 7}),
}


def _problem(name):
    """(the kernels' Problem, dO, float64 reference, same-dtype PyTorch) of CASES[name], fp16."""
    kind, b, h, h_kv, sq, sk, d, p = CASES[name]
    q, k, v, do, mask, keep = _case(kind, b, h, h_kv, sq, sk, d, **p)
    problem = K.Problem(q, k, v, None, None, sq, sk, mask, d ** -0.5)
    assert problem.tma_ok
    return problem, do, reference64(q, k, v, do, keep), pytorch_same_dtype(q, k, v, do, keep)


def _only(d, *names):
    return {n: d[n] for n in names}


@pytest.mark.parametrize("name", CASES)
def test_tma_forward_matches_plain_loads_and_float64(name, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    problem, _, ref, base = _problem(name)
    for bm, bn in ((32, 32), (64, 32)):
        plain, lse_plain = K.forward(problem, tuning.Config(bm, bn, 4, 2))
        tma, lse_tma = K.forward(problem, tuning.Config(bm, bn, 4, 2, tma=True))
        assert torch.equal(tma, plain) and torch.equal(lse_tma, lse_plain), f"{name} {bm}x{bn}"
        assert_relative_rule({"out": tma.double()}, _only(ref, "out"), _only(base, "out"), 1e-3,
                             f"{name} {bm}x{bn} tma", floor=1.0)


@pytest.mark.parametrize("name", CASES)
def test_tma_backward_matches_plain_loads_and_float64(name, monkeypatch):
    monkeypatch.setenv("VLFAST_POISON", "1")
    problem, do, ref, base = _problem(name)
    out, lse2 = K.forward(problem, tuning.Config(32, 32, 4, 2))
    for bm, bn in ((32, 32), (64, 32)):
        plain = K.backward(problem, do, out, lse2, tuning.Config(bm, bn, 4, 2))
        tma = K.backward(problem, do, out, lse2, tuning.Config(bm, bn, 4, 2, tma=True))
        assert all(torch.equal(a, b) for a, b in zip(tma, plain)), f"{name} {bm}x{bn}"
        got = dict(zip(("dq", "dk", "dv"), (x.double() for x in tma)))
        assert_relative_rule(got, _only(ref, "dq", "dk", "dv"), _only(base, "dq", "dk", "dv"), 1e-3,
                             f"{name} {bm}x{bn} tma backward", floor=1.0)


def test_calls_tma_cannot_serve_run_with_plain_loads():
    # a head dim of 100: rows of 200 bytes break TMA's 16-byte stride rule
    q, k, v, do, _, _ = _case("none", 1, 2, 2, 40, 40, 100)
    assert not K.Problem(q, k, v, None, None, 40, 40, None, 0.1).tma_ok
    # the packed (varlen) layout, and float32
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    packed = [x[0].transpose(0, 1).contiguous() for x in make_qkv(1, 2, 2, 40, 40, 64, torch.float16)[:3]]
    assert not K.Problem(*packed, cu, cu, 23, 23, None, 0.1).tma_ok
    q32, k32, v32, _ = make_qkv(1, 2, 2, 40, 40, 64, torch.float32)
    assert not K.Problem(q32, k32, v32, None, None, 40, 40, None, 0.1).tma_ok
    problem = K.Problem(q, k, v, None, None, 40, 40, None, 0.1)
    plain, _ = K.forward(problem, tuning.Config(32, 32, 4, 2))
    asked, _ = K.forward(problem, tuning.Config(32, 32, 4, 2, tma=True))
    assert torch.equal(asked, plain)

