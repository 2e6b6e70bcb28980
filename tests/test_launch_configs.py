"""How every Triton kernel picks its launch config (vlfast/_launch_configs.py): the default, the
interpreter's config, VLFAST_AUTOTUNE=1 timing, the records; and that the ops' launchers use it."""
import pytest
import torch

from vlfast import _launch_configs as lc


@pytest.fixture
def gpu_path(monkeypatch):
    """choose() as on a GPU (the kernels themselves still run wherever the test runs them), with a
    timer that counts calls and takes each run's return value as its milliseconds."""
    monkeypatch.setattr(lc, "triton_interpreting", lambda: False)
    monkeypatch.delenv("VLFAST_AUTOTUNE", raising=False)
    timed = []

    def fake_time(run):
        timed.append(1)
        return run()

    monkeypatch.setattr(lc, "_time_ms", fake_time)
    monkeypatch.setattr(lc, "_CHOSEN", {})
    return timed


def _kernel(name="test.kernel", interpreter=None):
    # key[0]: how many candidates; candidates are strings "c0", "c1", ...
    return lc.KernelConfigs(name, lambda key: [f"c{i}" for i in range(key[0])], interpreter=interpreter)


def test_without_autotuning_the_default_runs_untimed(gpu_path):
    kernel = _kernel()
    assert kernel.choose((3, "a"), run=lambda c: 1.0) == "c0"
    assert kernel.choose((3, "a")) == "c0"
    assert not gpu_path
    assert lc.chosen("test.") == {"test.kernel": {"(3, 'a')": {"config": "c0", "source": "default"}}}


def test_the_interpreter_never_times(gpu_path, monkeypatch):
    monkeypatch.setattr(lc, "triton_interpreting", lambda: True)
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    assert _kernel(interpreter="small").choose((3,), run=lambda c: 1.0) == "small"
    assert _kernel("test.other").choose((3,), run=lambda c: 1.0) == "c0"  # no interpreter config: the default
    assert not gpu_path
    assert {e["source"] for k in lc.chosen("test.").values() for e in k.values()} == {"interpreter"}


def test_autotuning_times_each_candidate_once_per_key(gpu_path, monkeypatch):
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    kernel = _kernel()
    ms = {"c0": 3.0, "c1": 1.0, "c2": 2.0}
    runs = []

    def run(config):
        runs.append(config)
        if config == "c3":
            raise RuntimeError("out of resources: shared memory\nmore detail")
        return ms[config]

    assert kernel.choose((4, "a"), run) == "c1"
    assert runs == ["c0", "c1", "c2", "c3"]
    record = lc.chosen("test.")["test.kernel"]["(4, 'a')"]
    assert record["source"] == "autotuned" and record["config"] == "c1"
    assert record["ms"] == {"c0": 3.0, "c1": 1.0, "c2": 2.0, "c3": "RuntimeError: out of resources: shared memory"}
    runs.clear()
    assert kernel.choose((4, "a"), run) == "c1" and not runs  # the same key: kept, not timed again
    assert kernel.choose((4, "b"), run) == "c1" and runs == ["c0", "c1", "c2", "c3"]  # another key: timed
    runs.clear()
    assert kernel.choose((1, "a"), run) == "c0" and not runs  # one candidate: nothing to time
    assert kernel.choose((4, "c")) == "c0" and not runs  # no run function: the default


def test_autotuning_ties_go_to_the_earlier_candidate(gpu_path, monkeypatch):
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    assert _kernel().choose((3,), lambda c: 1.0) == "c0"
    assert _kernel("test.b").choose((3,), lambda c: {"c0": 2.0, "c1": 1.0, "c2": 1.0}[c]) == "c1"


def test_autotuning_with_no_candidate_that_runs_raises_naming_the_kernel(gpu_path, monkeypatch):
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")

    def run(config):
        raise RuntimeError(f"{config} does not fit")

    with pytest.raises(RuntimeError, match=r"vlfast test.kernel: autotuning \(2,\): no candidate config ran.*c1 does not fit"):
        _kernel().choose((2,), run)


@pytest.mark.parametrize("interpreting", [False, True])
def test_a_bad_env_value_raises_naming_the_variable(gpu_path, monkeypatch, interpreting):
    monkeypatch.setattr(lc, "triton_interpreting", lambda: interpreting)
    monkeypatch.setenv("VLFAST_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="VLFAST_AUTOTUNE must be 0 or 1, got 'yes'"):
        _kernel().choose((2,), lambda c: 1.0)
    status = lc.describe()
    assert status["error"] and "VLFAST_AUTOTUNE" in status["summary"]


def test_records_are_per_kernel_and_forgotten_on_request(gpu_path):
    _kernel("test.a").choose((2, 1))
    _kernel("test.a").choose((2, 2))
    _kernel("other.b").choose((2,))
    assert set(lc.chosen("test.")["test.a"]) == {"(2, 1)", "(2, 2)"} and "other.b" not in lc.chosen("test.")
    assert set(lc.chosen("test.", forget=True)) == {"test.a"}
    assert lc.chosen("test.") == {} and set(lc.chosen()) == {"other.b"}


def test_describe_says_where_configs_come_from(gpu_path, monkeypatch):
    assert "built-in default" in lc.describe()["summary"]
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    assert lc.describe()["autotune"] and "times its candidate configs" in lc.describe()["summary"]
    monkeypatch.setattr(lc, "triton_interpreting", lambda: True)
    assert "interpreter" in lc.describe()["summary"]


# --- the ops' launchers ----------------------------------------------------------------------------

def test_every_op_declares_distinct_candidates():
    """Each launcher's KernelConfigs: distinct candidates (each costs a compile when timed), and a
    config of its own for the interpreter."""
    pytest.importorskip("triton")
    from vlfast.ops.clip_loss import triton as clip
    from vlfast.ops.codebook_lookup import triton as codebook
    from vlfast.ops.linear_cross_entropy import triton as lce
    from vlfast.ops.linear_cross_entropy import weight_grad
    keys = {clip.STATS_CONFIGS: [clip.launch_key(dt, 64, "softmax", True, p) for dt in (torch.bfloat16, torch.float32)
                                 for p in ("tf32", "ieee")],
            codebook.SCAN_CONFIGS: [codebook.launch_key(dt, d) for dt in (torch.bfloat16, torch.float32)
                                    for d in (8, 64, 100, 256, 512)],
            lce.ROW_CONFIGS: [()], weight_grad.GEMM_CONFIGS: [()], weight_grad.FINISH_CONFIGS: [()]}
    for configs, found in keys.items():
        for key in found:
            listed = configs.candidates(key)
            assert listed and len({str(c) for c in listed}) == len(listed), (configs.kernel, key)
        assert configs.interpreter is not None and configs.interpreter.num_warps <= 4
    assert clip.GRAD_CONFIGS.candidates(keys[clip.STATS_CONFIGS][0]) == clip.STATS_CONFIGS.candidates(
        keys[clip.STATS_CONFIGS][0])


def test_the_aot_tool_lists_every_family():
    """tests/tools/triton_aot.py compiles each kernel's candidates for the keys it builds; those keys
    reach every candidate family."""
    pytest.importorskip("triton")
    from tests.tools import triton_aot
    from vlfast.ops.codebook_lookup import triton as codebook
    sizes = {"bf16": 2, "fp16": 2, "fp32": 4}
    reached = {codebook.family(sizes[dtype], d) for dtype, dims in triton_aot.CODEBOOK_DIMS for d in dims}
    assert reached == set(codebook._FAMILIES)


@pytest.mark.triton
def test_clip_loss_launchers_record_their_choices():
    from vlfast.ops.clip_loss import triton as clip
    from tests.ops.clip_loss_cases import Case, make_inputs, run_vlfast
    case = Case(n=40, m=40, d=24, dtype=torch.float32)
    run_vlfast(case, "triton", *make_inputs(case))
    records = clip.tuned_configs()
    key = str(clip.launch_key(torch.float32, 24, "softmax", True, "ieee"))
    for name in ("clip_loss.stats", "clip_loss.grad"):
        assert records[name][key] == {"config": str(clip._INTERPRETER), "source": "interpreter"}


@pytest.mark.triton
def test_autotuned_clip_loss_matches_float64(gpu_path, monkeypatch):
    """With VLFAST_AUTOTUNE=1 the launchers time candidates before running the winner; here the
    timing is faked (the kernels run in the interpreter) so that a candidate with more programs than
    the winner runs first: the winner's d_scale and d_bias must not include its partial sums."""
    import itertools

    import triton

    from tests.ops.clip_loss_cases import Case, assert_relative_rule, make_inputs, pytorch_same_dtype, reference64
    from tests.ops.clip_loss_cases import run_vlfast
    from vlfast.ops.clip_loss import triton as clip
    monkeypatch.setenv("VLFAST_AUTOTUNE", "1")
    # tiles of at least 32 x 32, as the backward's partial sums are sized for
    narrow = triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4, num_stages=1)
    wide = triton.Config({"BM": 32, "BN": 64, "BK": 32}, num_warps=4, num_stages=1)
    monkeypatch.setattr(clip, "_EXACT_FP32", [narrow, wide])  # float32 runs exact: this family
    for configs in (clip.STATS_CONFIGS, clip.GRAD_CONFIGS):
        monkeypatch.setattr(configs, "_autotuned", {})
    ms = itertools.cycle([2.0, 1.0])  # candidates are timed in order: narrow 2 ms, then wide 1 ms
    monkeypatch.setattr(lc, "_time_ms", lambda run: (run(), next(ms))[1])
    for kind, bias in (("softmax", None), ("sigmoid", -2.0)):
        case = Case(n=70, m=70, d=40, dtype=torch.float32, kind=kind, bias=bias)
        inputs = make_inputs(case)
        got = run_vlfast(case, "triton", *inputs)
        assert_relative_rule(got, reference64(case, *inputs), pytorch_same_dtype(case, *inputs), 1e-5, kind)
        key = str(clip.launch_key(torch.float32, 40, kind, kind == "softmax", "ieee"))  # sigmoid: one direction
        for name in ("clip_loss.stats", "clip_loss.grad"):
            record = clip.tuned_configs()[name][key]
            assert record == {"config": str(wide), "source": "autotuned", "ms": {str(narrow): 2.0, str(wide): 1.0}}
