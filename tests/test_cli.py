"""`python -m vlfast info` and `python -m vlfast bench`, run as a user runs them (subprocesses)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vlfast

ROOT = Path(__file__).resolve().parent.parent
ROW_KEYS = {"op", "case", "impl", "shape", "dtype", "mode", "status", "message", "ms", "peak_bytes", "error",
            "errors", "error_ref", "error_note", "tflops", "device", "torch", "triton", "python", "vlfast",
            "git_sha", "timestamp"}


def _run(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _env_without_interpreter():
    # As a user's shell has it: conftest turns the Triton interpreter on for this test process.
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def info_json():
    out = _run("-m", "vlfast", "info", "--json", env=_env_without_interpreter())
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_info_json_fields(info_json):
    assert info_json["vlfast"] == vlfast.__version__
    assert info_json["torch"] == torch.__version__
    assert set(info_json["env"]) == {"VLFAST_IMPL", "VLFAST_NVTX", "TRITON_INTERPRET"}
    assert isinstance(info_json["extension"]["built"], bool)
    assert (info_json["cuda"] is None) == (not torch.cuda.is_available())
    assert "clip_loss" in info_json["ops"]
    assert info_json["launch_configs"]["summary"]
    from vlfast import _gemm
    gemm = info_json["cpu_fp32_gemm"]
    assert gemm["library"] == _gemm.cpu_fp32_gemm() and gemm["error"] is None
    for entry in info_json["ops"].values():
        assert set(entry["impls"]) == set(vlfast.IMPLS)
        assert all(why is None or (isinstance(why, str) and why) for why in entry["impls"].values())


def test_info_text_names_every_impl_and_each_reason(info_json):
    out = _run("-m", "vlfast", "info", env=_env_without_interpreter())
    assert out.returncode == 0, out.stderr
    text = out.stdout
    if not torch.cuda.is_available():
        assert "no CUDA device" in text
    assert f"configs  {info_json['launch_configs']['summary']}" in text  # how every kernel picks its configs
    assert f"cpu gemm float32 products of the CPU paths: {info_json['cpu_fp32_gemm']['library']} (" in text
    for op, entry in info_json["ops"].items():
        assert op in text
        for impl, why in entry["impls"].items():
            assert f"{impl:<10} " + ("available" if why is None else f"unavailable: {why}") in text
    # Without a GPU or the interpreter, Triton must say why it cannot run.
    if not torch.cuda.is_available():
        assert info_json["ops"]["clip_loss"]["impls"]["triton"] is not None


def test_info_rejects_unknown_arguments():
    out = _run("-m", "vlfast", "info", "--nope")
    assert out.returncode != 0
    assert "--nope" in out.stderr


def test_bench_tiny_writes_rows_table_and_plot(tmp_path):
    path, png = tmp_path / "rows.json", tmp_path / "bench.png"
    out = _run("-m", "vlfast", "bench", "clip_loss", "--quick", "--tiny", "--device", "cpu",
               "--json", str(path), "--plot", str(png))
    assert out.returncode == 0, out.stdout + out.stderr
    rows = json.loads(path.read_text())
    assert rows and all(ROW_KEYS <= set(r) for r in rows)
    assert {r["op"] for r in rows} == {"clip_loss"}
    # On a CPU the timed vlfast row is impl="torch"; the reference (the spec) is listed as skipped.
    assert all(r["status"] == "skipped" for r in rows if r["impl"] == "vlfast-reference")
    ref = [r for r in rows if r["impl"] == "vlfast-torch"]
    assert {(r["case"], r["mode"]) for r in ref} >= {("softmax-64x32-fp32", "fwd+bwd"), ("softmax-64x32-fp32", "fwd"),
                                                      ("sigmoid-64x32-fp32", "fwd+bwd")}
    for r in ref:
        assert r["status"] == "ok" and r["ms"] > 0 and r["error_ref"].startswith("fp64")
        expected = {"loss"} if r["mode"] == "fwd" else {"loss", "d_image", "d_text", "d_scale"}
        assert expected <= set(r["errors"])
        assert math.isfinite(r["error"]) and r["error"] < 1e-4  # fp32 math against fp64
        assert r["error"] == max(r["errors"].values())
    assert any(r["impl"] == "torch-dense" and r["status"] == "ok" for r in rows)
    # Peers record the settings they ran with; the compiled peer is timed, not skipped.
    assert all(r["config"] for r in rows if r["impl"].startswith("torch-dense") and r["status"] == "ok")
    assert {r["config"]["compiled"] is not False for r in rows if r["impl"] == "torch-dense[compiled]"} == {True}
    # Triton on a CPU is its interpreter: listed as skipped, never timed.
    assert all(r["status"] == "skipped" for r in rows if r["impl"] == "vlfast-triton")
    assert "vlfast-reference" in out.stdout and "skipped:" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unknown_op_lists_the_known_ones():
    out = _run("-m", "vlfast", "bench", "no_such_op")
    assert out.returncode != 0
    assert "unknown op 'no_such_op'" in out.stderr and "clip_loss" in out.stderr


def test_bench_module_form_runs():
    out = _run("-m", "vlfast.bench.bench_clip_loss", "--help")
    assert out.returncode == 0, out.stderr
    assert "clip_loss" in out.stdout


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    from vlfast.bench import report
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    why = report.plot([{"ms": 1.0}], str(tmp_path / "x.png"))
    assert why and "matplotlib" in why and not (tmp_path / "x.png").exists()


def test_a_failing_contender_or_reference_becomes_a_row_and_the_run_goes_on():
    from types import SimpleNamespace

    from vlfast.bench import runner
    from vlfast.bench.common import Case, Contender

    def broken(x, mode):
        raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB\nmore detail")

    def fine(x, mode):
        return {"loss": x.sum()}

    def reference(case, x, device):
        if case.name == "b":
            raise ValueError("no reference here")
        return {"loss": x.double().sum()}, "fp64 dense"

    op = SimpleNamespace(
        cases=lambda device, size: [Case("a", (4,), torch.float32), Case("b", (4,), torch.float32)],
        make_inputs=lambda case, device: torch.ones(4),
        reference=reference,
        contenders=lambda case, device: [Contender("broken", broken), Contender("fine", fine),
                                         Contender("absent", skip="not installed")],
        flops=lambda case, mode: None)
    rows = []
    runner.run_op("fake", op, torch.device("cpu"), "tiny", {}, rows.append)
    by = {(r["case"], r["impl"]): r for r in rows}
    assert by["a", "broken"]["status"] == "error"
    assert by["a", "broken"]["message"] == "RuntimeError: CUDA out of memory. Tried to allocate 64.00 GiB"
    assert by["a", "fine"]["status"] == "ok" and by["a", "fine"]["error"] == 0.0
    assert by["a", "absent"]["status"] == "skipped" and by["a", "absent"]["message"] == "not installed"
    assert by["b", "fine"]["status"] == "ok" and by["b", "fine"]["error"] is None
    assert by["b", "fine"]["error_note"] == "fp64 reference failed: ValueError: no reference here"


def _row(impl, ms, error, case="c", mode="fwd", status="ok", **errors):
    return {"op": "op", "case": case, "dtype": "float32", "mode": mode, "impl": impl, "status": status, "ms": ms,
            "error": error, "errors": {"out": error, **errors}}


def test_ratios_take_the_fastest_correct_peer():
    """vlfast's fastest correct row over the fastest correct peer; a peer off by more than 2 %, with a wrong
    index or other tokens, a NaN error (saved as the string "nan") or no error at all is not correct."""
    from vlfast.bench import report
    rows = [_row("vlfast-torch", 2.0, 1e-6), _row("vlfast-reference", 1.0, 0.5),
            _row("fast-but-off", 0.5, 0.03), _row("fast-wrong-index", 0.6, 1e-6, index_mismatch=0.01),
            _row("nan", 0.7, "nan"), _row("unchecked", 0.8, None), _row("right", 4.0, 1e-5),
            _row("failed", None, None, status="error"),
            _row("vlfast-torch", 3.0, 1e-6, case="d"), _row("wrong-tokens", 1.0, 0.0, case="d", tokens=0.5)]
    by = {r["case"]: r for r in report.ratios(rows)}
    assert by["c"]["impl"] == "vlfast-torch" and by["c"]["peer"] == "right" and by["c"]["ratio"] == 0.5
    assert set(by["c"]["wrong_peers"]) == {"fast-but-off", "fast-wrong-index", "nan", "unchecked"}
    assert by["d"]["peer"] is None and by["d"]["ratio"] is None and by["d"]["wrong_peers"] == ["wrong-tokens"]
    table = report.ratio_table(rows)
    assert "| op | c | fwd | torch 2.00 | right 4.00 (fast-but-off, fast-wrong-index, nan, unchecked: wrong) | 0.50 |" \
        in table
    assert "| op | d | fwd | torch 3.00 | none correct (wrong-tokens wrong) | — |" in table


def test_a_bar_is_shown_but_never_the_peer():
    """A bar (Contender.bar: SDPA on a contiguous copy of a paged cache) faster than every peer is named in the
    table but the ratio is against the fastest correct peer; rows saved before bars existed are peers."""
    from vlfast.bench import report
    rows = [_row("vlfast-torch", 2.0, 1e-6), {**_row("contiguous", 1.0, 1e-6), "bar": True},
            {**_row("gathered", 4.0, 1e-6), "bar": False}, _row("old-row", 5.0, 1e-6)]
    (r,) = report.ratios(rows)
    assert r["peer"] == "gathered" and r["ratio"] == 0.5 and r["bars"] == [("contiguous", 1.0)]
    assert "| op | c | fwd | torch 2.00 | gathered 4.00 (bar, not a peer: contiguous 1.00) | 0.50 |" \
        in report.ratio_table(rows)


def test_bench_ratios_reads_a_saved_run(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([_row("vlfast-torch", 1.0, 0.0), _row("peer", 2.0, 0.0)]))
    out = _run("-m", "vlfast", "bench", "--ratios", str(path))
    assert out.returncode == 0, out.stderr
    assert "| op | c | fwd | torch 1.00 | peer 2.00 | 0.50 |" in out.stdout
    assert _run("-m", "vlfast", "bench", "clip_loss", "--ratios", str(path)).returncode != 0
    path.write_text(json.dumps({"not": "rows"}))
    bad = _run("-m", "vlfast", "bench", "--ratios", str(path))
    assert bad.returncode == 2 and "expected the JSON list of rows" in bad.stderr and "Traceback" not in bad.stderr
    path.write_text("not json")
    assert _run("-m", "vlfast", "bench", "--ratios", str(path)).returncode == 2
    missing = _run("-m", "vlfast", "bench", "--ratios", str(tmp_path / "absent.json"))
    assert missing.returncode == 2 and "absent.json" in missing.stderr and "Traceback" not in missing.stderr


def test_bench_ratios_over_several_runs(tmp_path):
    """More runs: the first run's table, and a last column with each row's lowest and highest ratio over all
    of them (a row no other run has, or one without a correct peer, counts only where it has a ratio)."""
    runs = [[_row("vlfast-torch", 1.0, 0.0), _row("peer", 2.0, 0.0), _row("vlfast-torch", 1.0, 0.0, case="d"),
             _row("peer", 1.0, 0.5, case="d")],
            [_row("vlfast-torch", 3.0, 0.0), _row("peer", 2.5, 0.0)],
            [_row("vlfast-torch", 1.1, 0.0), _row("peer", 2.0, 0.0), _row("vlfast-torch", 1.0, 0.0, case="e"),
             _row("peer", 1.0, 0.0, case="e")]]
    paths = []
    for i, rows in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(rows))
    out = _run("-m", "vlfast", "bench", "--ratios", *map(str, paths))
    assert out.returncode == 0, out.stderr
    assert "| ratio | ratio over 3 runs |" in out.stdout
    assert "| op | c | fwd | torch 1.00 | peer 2.00 | 0.50 | 0.50–1.20 (3) |" in out.stdout
    assert "| op | d | fwd | torch 1.00 | none correct (peer wrong) | — | — |" in out.stdout
    assert "| e |" not in out.stdout  # rows of the first run only
    paths[1].write_text("not json")
    bad = _run("-m", "vlfast", "bench", "--ratios", *map(str, paths))
    assert bad.returncode == 2 and "run1.json" in bad.stderr


@pytest.mark.parametrize("names", ["abc", "ab", "abcd"])
def test_cpu_contenders_are_timed_in_turns(names):
    """On a CPU every contender of a case and mode runs once per round, in a rotated order (two simply
    alternate), and never twice in a row."""
    from vlfast.bench.common import MAX_ROUNDS, MIN_ROUNDS, measure_interleaved
    calls = []
    ms = measure_interleaved({name: (lambda n=name: calls.append(n)) for name in names})
    n = len(names)
    assert set(ms) == set(names) and all(t >= 0 for t in ms.values())
    rounds = len(calls) // n
    assert MIN_ROUNDS <= rounds <= MAX_ROUNDS and len(calls) == n * rounds
    assert all(sorted(calls[i:i + n]) == list(names) for i in range(0, len(calls), n))
    assert all(a != b for a, b in zip(calls, calls[1:]))
    if n > 2:
        assert calls[n:2 * n] == list(names[1:] + names[0])  # the second round starts one later


def test_gpu_contenders_are_timed_one_at_a_time(monkeypatch):
    """Off the CPU each checked contender is timed alone (measure: do_bench on a GPU), right after which
    its describe() is recorded; a failed check is not timed."""
    from vlfast.bench import runner
    from vlfast.bench.common import Contender
    timed = []
    monkeypatch.setattr(runner, "measure", lambda fn, device: (timed.append(fn()) or 2.0, 7))

    def broken(x, mode):
        raise RuntimeError("no")

    runs = [(Contender("a", lambda x, m: "a", describe=lambda: {"last": timed[-1]}), "fwd"),
            (Contender("b", broken), "fwd"), (Contender("c", lambda x, m: "c"), "fwd")]
    from types import SimpleNamespace
    progress = SimpleNamespace(set_postfix_str=lambda *a: None, update=lambda n: None)
    results = runner._time_case(runs, None, None, torch.device("meta"), lambda out, ref: {}, progress,
                                lambda c, m: c.name)
    assert timed == ["a", "c"]
    assert results[0] == {"status": "ok", "errors": {}, "ms": 2.0, "peak_bytes": 7, "config": {"last": "a"}}
    assert results[1]["status"] == "error" and "ms" not in results[1]
    assert results[2]["ms"] == 2.0 and "config" not in results[2]
