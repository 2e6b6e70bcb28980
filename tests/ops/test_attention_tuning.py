"""The attention kernels' launch configs (vlfast/ops/attention/tuning.py, chosen the way every
kernel's are: vlfast/_launch_configs.py): mask kinds, keys, the defaults and candidates the
ahead-of-time compiles cover, autotuning per key, and every candidate tile's numerics in the interpreter."""
import pytest
import torch

import vlfast.masks as M
from vlfast import _launch_configs as lc
from vlfast.ops.attention import tuning

from .attention_cases import loop_mask, make_qkv, pytorch_same_dtype, reference64, span_ids
from .clip_loss_cases import assert_relative_rule

HALF_AND_FP32 = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def gpu_path(monkeypatch):
    """Configs chosen as on a GPU (no interpreter), VLFAST_AUTOTUNE unset, nothing autotuned yet."""
    monkeypatch.setattr(lc, "triton_interpreting", lambda: False)
    monkeypatch.delenv("VLFAST_AUTOTUNE", raising=False)
    monkeypatch.setattr(lc, "_CHOSEN", {})
    for configs in tuning.CONFIGS.values():
        monkeypatch.setattr(configs, "_autotuned", {})


# --- mask kinds ---------------------------------------------------------------------------------------

def test_mask_kind_of_every_mask_and_composition():
    ids = torch.tensor(span_ids(20, [(0, 5)]), dtype=torch.int32)
    valid = torch.ones(2, 20, dtype=torch.bool)
    padding = M.key_padding(valid)
    cases = [
        (None, "none"), (M.no_mask(), "none"), (M.causal(), "causal"), (M.sliding_window(4), "window"),
        (M.spans(ids), "spans"), (M.image_prefix(5, 20), "spans"), (padding, "padding"),
        (M.dalle(4, 4, 4, "row"), "dalle_row"), (M.dalle(4, 4, 4, "column"), "dalle_column"),
        (M.dalle(4, 4, 4, "conv", kernel=3), "dalle_conv"),
        # compositions: DALL-E > spans > window > causal > padding
        (M.causal() & padding, "causal"), (M.sliding_window(4) & padding, "window"),
        (M.spans(ids) & padding, "spans"), (M.spans(ids) & M.sliding_window(4), "spans"),
        (M.dalle(4, 4, 4, "column") & padding, "dalle_column"), (M.causal() & M.sliding_window(3), "window"),
        (M.Mask(causal=True, window=3), "window"),
    ]
    for mask, want in cases:
        assert tuning.mask_kind(mask) == want, mask
    assert {want for _, want in cases} == set(tuning.KINDS)


# --- defaults and candidates ----------------------------------------------------------------------------

def _block_d(head_dim: int) -> int:
    """The kernels' BLOCK_D family, which sets their register and shared-memory use."""
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def test_the_aot_compiles_cover_every_default_and_candidate():
    """tests/tools/triton_aot.py compiles each pass's candidates (the default first) at a few head
    dims; every head dim's candidates must be among those compiled for its BLOCK_D family and dtype
    class (fp16 and bf16 share theirs), so that the compile tests check whatever can run."""
    from tests.tools import triton_aot
    for dtype in HALF_AND_FP32:
        compiled_as = torch.float32 if dtype == torch.float32 else torch.bfloat16
        for pass_ in tuning.PASSES:
            compiled = {(_block_d(d), c) for d in triton_aot.ATTENTION_HEAD_DIMS
                        for c in tuning.candidates(d, compiled_as, pass_)}
            for d in range(1, tuning.MAX_HEAD_DIM + 1):
                found = tuning.candidates(d, dtype, pass_)
                assert found[0] == tuning.default_config(d, dtype, pass_)
                missing = [c for c in found if (_block_d(d), c) not in compiled]
                assert not missing, (d, dtype, pass_, missing)


def test_candidates_are_distinct_tiles_the_kernels_take():
    for dtype in HALF_AND_FP32:
        for d in range(1, 257):
            for pass_ in tuning.PASSES:
                found = tuning.candidates(d, dtype, pass_)
                assert len(set(found)) == len(found)
                for c in found:
                    assert all(x & (x - 1) == 0 for x in (c.bm, c.bn, c.num_warps)) and 16 <= min(c.bm, c.bn)
                    assert dtype == torch.float32 or c.bm >= 64, c  # wgmma needs 64 rows
    with pytest.raises(ValueError, match="head dims 1 to 256, got 257"):
        tuning.candidates(257, torch.bfloat16, "fwd")
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        tuning.default_config(64, torch.float64, "fwd")
    with pytest.raises(ValueError, match="pass must be one of"):
        tuning.launch_key("fwd+bwd", torch.bfloat16, 64, "none", "tf32", 100)


def test_problem_takes_the_default_and_records_it(gpu_path):
    from vlfast.ops.attention import triton as K
    q, k, v, _ = make_qkv(1, 2, 2, 40, 40, 96, torch.bfloat16)
    p = K.Problem(q, k, v, None, None, 40, 40, M.image_prefix(9, 40), 96 ** -0.5)
    assert p.kind == "spans"
    assert p.config("fwd", None) == tuning.candidates(96, torch.bfloat16, "fwd")[0]
    assert p.config("bwd", None) == tuning.candidates(96, torch.bfloat16, "bwd")[0]
    key = str(tuning.launch_key("fwd", torch.bfloat16, 96, "spans", p.flags["PRECISION"], 40))
    assert tuning.last_choices()["attention.fwd"][key] == {"config": str(p.configs["fwd"]), "source": "default"}
    assert set(tuning.last_choices(forget=True)) == {"attention.fwd", "attention.bwd"}
    assert tuning.last_choices() == {}


def test_the_interpreter_runs_small_tiles(monkeypatch):
    monkeypatch.setattr(lc, "triton_interpreting", lambda: True)
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")  # never timed there
    for dtype in HALF_AND_FP32:
        for d in (16, 72, 128, 256):
            for pass_ in tuning.PASSES:
                key = tuning.launch_key(pass_, dtype, d, "spans", "tf32", 1000)
                assert tuning.CONFIGS[pass_].choose(key, run=pytest.fail) == tuning.Config(32, 32, 1, 1)


def test_autotuning_keys_on_kind_length_and_head_dim(gpu_path, monkeypatch):
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    monkeypatch.setattr(lc, "_time_ms", lambda run: run())
    fast = tuning.Config(64, 32, 8, 3)
    timed = []

    def run(config):
        timed.append(config)
        return 0.5 if config == fast else 1.0

    def choose(d, kind, length):
        return tuning.CONFIGS["bwd"].choose(tuning.launch_key("bwd", torch.bfloat16, d, kind, "tf32", length), run)

    assert choose(96, "causal", 2000) == fast
    assert timed == tuning.candidates(96, torch.bfloat16, "bwd")
    timed.clear()
    assert choose(96, "causal", 1500) == fast and not timed  # the same length bucket (2048): kept
    for d, kind, length in ((80, "causal", 1500), (96, "causal", 5000), (96, "spans", 2000)):
        choose(d, kind, length)
        assert timed == tuning.candidates(d, torch.bfloat16, "bwd"), (d, kind, length)
        timed.clear()


# --- every candidate in the interpreter ------------------------------------------------------------------

def _distinct_tiles(pass_: str) -> list:
    """Each (BM, BN) of any candidate: the interpreter ignores warps and stages."""
    tiles = {(c.bm, c.bn) for dtype in (torch.float32, torch.bfloat16) for d in range(1, 257)
             for c in tuning.candidates(d, dtype, pass_)}
    return sorted(tiles)


def _candidate_case(dtype=torch.float32):
    """B1, 4 query heads on 2 kv heads, 150 tokens, D 72, two image spans off the block edges."""
    from vlfast.ops.attention import triton as K
    s, d = 150, 72
    ids = span_ids(s, [(3, 40), (97, 21)])
    keep = loop_mask("spans", s, s, ids=ids)[None, None]
    q, k, v, do = make_qkv(1, 4, 2, s, s, d, dtype)
    problem = K.Problem(q, k, v, None, None, s, s, M.spans(torch.tensor(ids, dtype=torch.int32)), d ** -0.5)
    return K, problem, (q, k, v, do), reference64(q, k, v, do, keep), pytorch_same_dtype(q, k, v, do, keep)


def _named(out=None, dq=None, dk=None, dv=None):
    return {"loss": out, "image": dq, "text": dk, "scale": None, "bias": dv}


@pytest.mark.triton
@pytest.mark.parametrize("pass_", tuning.PASSES)
def test_every_candidate_tile_is_correct(pass_, monkeypatch):
    """Each candidate's tiles (and its own block map) against float64: the forward alone, or the
    backward from the default forward's output."""
    monkeypatch.setenv("VLFAST_POISON", "1")
    K, p, (q, k, v, do), ref, base = _candidate_case()
    out0, lse2 = K.forward(p, tuning.INTERPRETER_CONFIG)
    for bm, bn in _distinct_tiles(pass_):
        config = tuning.Config(bm, bn, 4, 2)
        ctx = f"{pass_} {config}"
        if pass_ == "fwd":
            out, _ = K.forward(p, config)
            assert_relative_rule(_named(out=out.double()), _named(out=ref["out"]), _named(out=base["out"]), 1e-5,
                                 ctx, floor=1.0)
        else:
            dq, dk, dv = K.backward(p, do, out0, lse2, config)
            got = _named(None, dq.double(), dk.double(), dv.double())
            assert_relative_rule(got, _named(None, ref["dq"], ref["dk"], ref["dv"]),
                                 _named(None, base["dq"], base["dk"], base["dv"]), 1e-5, ctx, floor=1.0)
