"""The attention kernels' launch configs (vlfast/ops/attention/tuning.py): mask kinds, the built-in
defaults, tuned tables, autotuning, and every candidate config's numerics in the interpreter."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlfast.masks as M
from vlfast.ops.attention import tuning

from .attention_cases import loop_mask, make_qkv, pytorch_same_dtype, reference64, span_ids
from .clip_loss_cases import assert_relative_rule

HALF_AND_FP32 = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture
def compiled_path(monkeypatch):
    """tuning.py as on a GPU without a tuned table: no interpreter, no autotuning, no GPU to match."""
    monkeypatch.setattr(tuning, "_INTERPRET", False)
    monkeypatch.setattr(tuning, "_AUTOTUNE", False)
    monkeypatch.setattr(tuning, "_gpu", lambda device: None)
    monkeypatch.setattr(tuning, "_TABLES", {})
    monkeypatch.setattr(tuning, "_AUTOTUNED", {})
    monkeypatch.setattr(tuning, "_LAST", {})


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
        (M.Mask(window=3), "window"),
    ]
    for mask, want in cases:
        assert tuning.mask_kind(mask) == want, mask
    assert {want for _, want in cases} == set(tuning.KINDS)


# --- the built-in defaults ------------------------------------------------------------------------------

def _stated_rule(head_dim: int, dtype: torch.dtype) -> dict:
    """The defaults as tuning.py's comment states them (compiled path)."""
    if dtype == torch.float32:
        tiles = {"fwd": (64, 32), "bwd": (32, 32)}
    elif head_dim <= 128:
        tiles = {"fwd": (128, 64), "bwd": (64, 64)}
    else:
        tiles = {"fwd": (64, 64), "bwd": (64, 32)}
    stages = 3 if head_dim <= 128 else 2
    (fm, fn), (bm, bn) = tiles["fwd"], tiles["bwd"]
    return {"fwd": tuning.Config(fm, fn, 8 if fm >= 128 or head_dim >= 128 else 4, stages),
            "bwd": tuning.Config(bm, bn, 8, stages)}


def test_defaults_follow_the_stated_rule(compiled_path):
    for dtype in HALF_AND_FP32:
        for d in range(1, 257):
            want = _stated_rule(d, dtype)
            for kind in tuning.KINDS:
                for pass_ in tuning.PASSES:
                    got = tuning.choose(d, dtype, kind, pass_, length=2048, run=lambda c: None)
                    assert got == want[pass_] == tuning.default_config(d, dtype, kind, pass_), (d, dtype, kind, pass_)
                    assert tuning.candidates(d, dtype, pass_)[0] == want[pass_]


def test_the_interpreter_runs_small_tiles(monkeypatch):
    monkeypatch.setattr(tuning, "_INTERPRET", True)
    for dtype in HALF_AND_FP32:
        for d in (16, 72, 128, 256):
            assert tuning.choose(d, dtype, "spans", "bwd") == tuning.Config(32, 32, 1, 1)


def test_problem_takes_its_configs_from_tuning(compiled_path):
    from vlfast.ops.attention import triton as K
    q, k, v, _ = make_qkv(1, 2, 2, 40, 40, 96, torch.bfloat16)
    p = K.Problem(q, k, v, None, None, 40, 40, M.image_prefix(9, 40), 96 ** -0.5)
    assert p.kind == "spans"
    assert p.config("fwd", None) == tuning.Config(128, 64, 8, 3)
    assert p.config("bwd", None) == tuning.Config(64, 64, 8, 3)


def test_candidates_are_distinct_tiles_the_kernels_take():
    for dtype in HALF_AND_FP32:
        for d in range(1, 257):
            for pass_ in tuning.PASSES:
                found = tuning.candidates(d, dtype, pass_)
                assert len(set(found)) == len(found) and found[0] == tuning.default_config(d, dtype, "none", pass_)
                for c in found:
                    assert all(x & (x - 1) == 0 for x in (c.bm, c.bn, c.num_warps)) and 16 <= min(c.bm, c.bn)
                    assert dtype == torch.float32 or c.bm >= 64, c  # wgmma needs 64 rows
    with pytest.raises(ValueError, match="head dims up to 256"):
        tuning.head_dim_bucket(257)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        tuning.dtype_class(torch.float64)


# --- tuned tables -----------------------------------------------------------------------------------------

MEASURED = {"device": "Test GPU", "torch": "2.11.0", "triton": "3.6.0", "date": "2026-12-01"}


def _write_table(folder, configs, gpu="Test GPU", capability="9.0", measured=MEASURED, name="test.json", **extra):
    table = {**tuning.empty_table(gpu, capability), "measured": measured, "configs": configs, **extra}
    path = folder / name
    path.write_text(json.dumps(table))
    return path


@pytest.fixture
def table_dir(tmp_path, monkeypatch, compiled_path):
    monkeypatch.setattr(tuning, "TABLE_DIR", tmp_path)
    monkeypatch.setattr(tuning, "_gpu", lambda device: ("Test GPU", "9.0"))
    return tmp_path


def test_a_table_entry_overrides_the_default(table_dir):
    entry = {"bm": 64, "bn": 128, "num_warps": 4, "num_stages": 2, "ms": 0.5, "default_ms": 0.6}
    _write_table(table_dir, {"half/d65-72/causal/fwd": entry})
    _write_table(table_dir, {"half/d65-72/spans/fwd": entry}, gpu="Another GPU", name="other.json")
    assert tuning.choose(72, torch.bfloat16, "causal", "fwd") == tuning.Config(64, 128, 4, 2)
    assert tuning.choose(65, torch.float16, "causal", "fwd") == tuning.Config(64, 128, 4, 2)
    assert tuning.last_choices()["fwd"] == {"config": "64x128 w4 s2", "source": "table test.json half/d65-72/causal/fwd"}
    # other keys, and other GPUs' tables, keep the defaults
    for args in ((72, torch.bfloat16, "causal", "bwd"), (72, torch.bfloat16, "spans", "fwd"),
                 (80, torch.bfloat16, "causal", "fwd"), (72, torch.float32, "causal", "fwd")):
        assert tuning.choose(*args) == tuning.default_config(*args)
    status = tuning.describe()
    assert status["entries"] == 1 and status["table"].endswith("test.json") and "1 entries" in status["summary"]


def test_an_empty_table_keeps_the_defaults(table_dir):
    _write_table(table_dir, {}, measured={k: None for k in tuning.MEASURED_FIELDS})
    assert tuning.choose(128, torch.bfloat16, "none", "bwd") == tuning.Config(64, 64, 8, 3)
    assert "until a GPU run fills it" in tuning.describe()["summary"]


GOOD = {"bm": 64, "bn": 64, "num_warps": 4, "num_stages": 3}


@pytest.mark.parametrize("configs,extra,match", [
    ({"half/d65-72/causal": GOOD}, {}, r"configs\['half/d65-72/causal'\]: keys are"),
    ({"bf16/d65-72/causal/fwd": GOOD}, {}, r"configs\['bf16/d65-72/causal/fwd'\]: unknown dtype class 'bf16'"),
    ({"half/d72/causal/fwd": GOOD}, {}, r"unknown head-dim bucket 'd72'"),
    ({"half/d65-72/prefix/fwd": GOOD}, {}, r"unknown mask kind 'prefix'"),
    ({"half/d65-72/causal/fwd": {**GOOD, "bm": 48}}, {}, r"configs\['half/d65-72/causal/fwd'\]: field 'bm' must be"),
    ({"half/d65-72/causal/bwd": {**GOOD, "num_warps": "8"}}, {}, r"\[.half/d65-72/causal/bwd.\]: field 'num_warps'"),
    ({"half/d65-72/causal/fwd": {k: v for k, v in GOOD.items() if k != "bn"}}, {}, r"missing field 'bn'"),
    ({"half/d65-72/causal/fwd": {**GOOD, "warps": 4}}, {}, r"unknown field 'warps'"),
    ({"half/d65-72/causal/fwd": [64, 64, 4, 3]}, {}, r"must be an object"),
    ({}, {"format": 2}, r"field 'format': must be 1"),
    ({}, {"gpu": None}, r"field 'gpu'"),
])
def test_a_malformed_table_gets_a_clear_error(table_dir, configs, extra, match):
    path = _write_table(table_dir, configs, **extra)
    with pytest.raises(tuning.TableError, match=match) as info:
        tuning.choose(72, torch.bfloat16, "causal", "fwd")
    assert str(path) in str(info.value)
    assert tuning.describe()["error"] is not None  # `vlfast info` reports it instead of failing


def test_entries_need_the_run_that_measured_them(table_dir):
    _write_table(table_dir, {"half/d128/none/fwd": GOOD}, measured={**MEASURED, "date": None})
    with pytest.raises(tuning.TableError, match=r"'measured'.date: a table with entries must name the run"):
        tuning.choose(128, torch.bfloat16, "none", "fwd")
    (table_dir / "test.json").write_text("{not json")
    with pytest.raises(tuning.TableError, match="cannot read it as JSON"):
        tuning.load_table(table_dir / "test.json")


def test_shipped_tables_load_and_name_their_gpu():
    tables = tuning.shipped_tables()
    assert any(t.path.name == "h200.json" and t.gpu == "NVIDIA H200" and t.capability == "9.0" for t in tables)
    for t in tables:  # load_table checks every entry, and that a table with entries says who measured it
        assert set(tuning.MEASURED_FIELDS) <= set(t.measured)


# --- autotuning ------------------------------------------------------------------------------------------

def test_autotuning_times_every_candidate_once_per_key(compiled_path, monkeypatch):
    monkeypatch.setattr(tuning, "_AUTOTUNE", True)
    fast = tuning.Config(64, 32, 8, 3)
    timings = {}

    def fake_time(run):
        return run()

    def run(config):
        timings[config] = timings.get(config, 0) + 1
        if config == tuning.Config(128, 128, 8, 2):
            raise RuntimeError("out of resources: shared memory")
        return 0.5 if config == fast else 1.0

    monkeypatch.setattr(tuning, "_time", fake_time)
    bwd_candidates = set(tuning.candidates(96, torch.bfloat16, "bwd"))
    assert tuning.choose(96, torch.bfloat16, "causal", "bwd", length=2000, precision="tf32", run=run) == fast
    assert set(timings) == bwd_candidates
    timings.clear()
    # the same key (length 1500 is in the same length bucket, 2048): no timing
    assert tuning.choose(96, torch.bfloat16, "causal", "bwd", length=1500, precision="tf32", run=run) == fast
    assert not timings
    # another head-dim bucket or length bucket: timed again
    tuning.choose(80, torch.bfloat16, "causal", "bwd", length=1500, precision="tf32", run=run)
    tuning.choose(96, torch.bfloat16, "causal", "bwd", length=5000, precision="tf32", run=run)
    assert set(timings) == bwd_candidates and all(n == 2 for n in timings.values())
    keys = [k for k in tuning.autotuned() if k[3] == "bwd"]
    assert sorted((k[1], k[6]) for k in keys) == [("d73-80", 2048), ("d81-96", 2048), ("d81-96", 8192)]
    winner, results = tuning.autotuned()[("half", "d81-96", "causal", "bwd", "bfloat16", "tf32", 2048)]
    assert winner == fast and results[str(fast)] == 0.5 and len(results) == len(bwd_candidates)
    assert tuning.last_choices(forget=True)["bwd"]["source"].startswith("autotuned")
    assert tuning.last_choices() == {}
    # the forward's failing candidate is skipped and reported; the default wins ties
    assert tuning.choose(96, torch.bfloat16, "causal", "fwd", length=100, run=run) == tuning.Config(128, 64, 8, 3)
    (results,) = [r for k, (_, r) in tuning.autotuned().items() if k[3] == "fwd"]
    assert results[str(tuning.Config(128, 128, 8, 2))].startswith("RuntimeError: out of resources")
    # without a run function (nothing to time) the table or default is used
    assert tuning.choose(104, torch.bfloat16, "none", "fwd") == tuning.Config(128, 64, 8, 3)


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


# --- benchmarks/tune_attention.py ------------------------------------------------------------------------

def _tune_script(*args, interpret: bool):
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(root / "benchmarks" / "tune_attention.py"), *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_tune_script_says_it_needs_a_gpu(tmp_path):
    out = _tune_script("--out", str(tmp_path / "t.json"), interpret=False)
    assert out.returncode != 0 and "on a CUDA GPU, and there is none here" in out.stderr
    assert not (tmp_path / "t.json").exists()


@pytest.mark.triton
def test_tune_script_writes_a_table_vlfast_reads(tmp_path):
    """The whole procedure in the interpreter (--cpu-dry-run), then a second run that resumes."""
    path = tmp_path / "t.json"
    out = _tune_script("--cpu-dry-run", "--head-dims", "72", "--kinds", "spans", "--out", str(path), interpret=True)
    assert out.returncode == 0, out.stderr[-3000:]
    table = tuning.load_table(path)
    assert set(table.configs) == {"half/d65-72/spans/fwd", "half/d65-72/spans/bwd"}
    assert table.gpu == "cpu dry run" and all(table.measured[f] for f in tuning.MEASURED_FIELDS)
    for key, config in table.configs.items():
        assert config in tuning.candidates(72, torch.bfloat16, key.split("/")[3])
    again = _tune_script("--cpu-dry-run", "--head-dims", "72", "--kinds", "spans", "--out", str(path), interpret=True)
    assert again.returncode == 0 and "in the table already" in again.stdout
