"""The harness behind `python -m vlfast bench`: every op's cases, every contender, one row each.

The ops are the files vlfast/bench/bench_<op>.py; each provides
  cases(device, size) -> [Case]                      size: "full", "quick" or "tiny"
  make_inputs(case, device) -> inputs
  reference(case, inputs, device) -> (float64 outputs, how) or (None, why there are none)
  contenders(case, device) -> [Contender]            vlfast's implementations and the peers
  flops(case, mode) -> float or None
  bytes_read(case) -> float                          optional, for memory-bound ops: GB/s per row
  tokens_generated(case) -> int                      optional, for generation: tokens/s per row
  compare(outputs, reference) -> {name: error}       optional; default: max relative error per output
A failure in one case or contender becomes an error row and the run goes on.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlfast.bench import report
from vlfast.bench.common import (compare, cpu_peak_bytes, free_memory, measure, measure_interleaved, synchronize,
                                 worst)

HERE = Path(__file__).resolve().parent


def known_ops() -> list:
    return sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))


def parse_args(argv) -> argparse.Namespace:
    ops = known_ops()
    p = argparse.ArgumentParser(prog="python -m vlfast bench",
                                description="vlfast's implementations and their peers side by side: max "
                                            "relative error vs float64, median time, peak extra memory.")
    p.add_argument("ops", nargs="*", metavar="OP", help=f"ops to run (default: all): {', '.join(ops)}")
    p.add_argument("--quick", action="store_true", help="fewer, mid sizes; on a CPU, small ones in under 2 minutes")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, a few seconds (for tests)")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: grouped bars per case, log-scale ms")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when there is a GPU")
    p.add_argument("--ratios", metavar="PATH", nargs="+",
                   help="run nothing: print the ratio table of the rows saved in PATH (a --json file); given more "
                        "runs, a last column has each row's lowest and highest ratio over them all")
    args = p.parse_args(argv)
    if args.ratios and (args.ops or args.json or args.plot):
        p.error("--ratios reads a saved run; it takes no ops, --json or --plot")
    unknown = [op for op in args.ops if op not in ops]
    if unknown:
        p.error(f"unknown op{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                f"known ops: {', '.join(ops)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    args.ops = args.ops or ops
    return args


def _modes(contender, case) -> tuple:
    return tuple(m for m in case.modes if contender.modes is None or m in contender.modes)


def _describe(e: Exception) -> str:
    """The exception's type and first line: CUDA and Triton messages run to pages."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}"[:300] if lines else type(e).__name__


def _checked(contender, inputs, mode, ref, device, compare_fn=compare) -> dict:
    """One contender in one mode, untimed: errors from a first (warm-up) call."""
    try:
        outputs = contender.run(inputs, mode)
        synchronize(device)
        errors = compare_fn(outputs, ref) if ref is not None else {}
        del outputs
        return {"status": "ok", "errors": errors}
    except Exception as e:  # out of memory, a peer's own limits, a bug: record it and go on
        return {"status": "error", "message": _describe(e)}


def _timed(contender, inputs, mode, device) -> dict:
    """Time and memory of one checked contender alone (GPU: do_bench or a few synchronised runs)."""
    try:
        ms, peak = measure(lambda: contender.run(inputs, mode), device)
        return {"ms": ms, "peak_bytes": peak}
    except Exception as e:
        return {"status": "error", "message": _describe(e)}


def _timed_in_turns(runs: list, inputs) -> list:
    """[{ms, peak_bytes}] for CPU (contender, mode) pairs of one mode, timed in turns (measure_interleaved)."""
    try:
        ms = measure_interleaved({i: (lambda c=c, m=m: c.run(inputs, m)) for i, (c, m) in enumerate(runs)})
    except Exception:  # one failing now (it passed its check) spoils the turns: time each alone
        return [_timed(c, inputs, m, torch.device("cpu")) for c, m in runs]
    return [{"ms": ms[i], "peak_bytes": cpu_peak_bytes(lambda: c.run(inputs, m))} for i, (c, m) in enumerate(runs)]


def _time_case(runs: list, inputs, ref, device, compare_fn, progress, label) -> list:
    """[result] per (contender, mode) in runs: checked one by one, then timed (CPU: each mode's
    contenders in turns)."""
    results = []
    for c, m in runs:
        progress.set_postfix_str(label(c, m))
        results.append(_checked(c, inputs, m, ref, device, compare_fn))
        free_memory(device)
    ok = [i for i, r in enumerate(results) if r["status"] == "ok"]
    # groups timed together: each mode's contenders in turns on a CPU, one at a time on a GPU
    groups = ([[i for i in ok if runs[i][1] == mode] for mode in dict.fromkeys(runs[i][1] for i in ok)]
              if device.type == "cpu" else [[i] for i in ok])
    for group in groups:
        if device.type == "cpu":
            timings = _timed_in_turns([runs[i] for i in group], inputs)
        else:
            timings = [_timed(runs[group[0]][0], inputs, runs[group[0]][1], device)]
        for i, timing in zip(group, timings):
            results[i].update(timing)
            if runs[i][0].describe is not None and results[i]["status"] == "ok":
                results[i]["config"] = runs[i][0].describe()  # e.g. the launch configs its last call chose
        free_memory(device)
    progress.update(len(runs))
    return results


def run_op(op: str, module, device: torch.device, size: str, meta: dict, emit) -> None:
    """Every case of `op`; emit(row) receives each row as soon as it is measured."""
    plan = [(case, module.contenders(case, device)) for case in module.cases(device, size)]
    progress = tqdm(total=sum(len(_modes(c, case)) for case, cs in plan for c in cs if c.skip is None),
                    desc=op, unit="run", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
    for case, contenders in plan:
        base = {"op": op, "case": case.name, "shape": list(case.shape), "dtype": str(case.dtype).replace("torch.", ""),
                "params": case.params}

        bars = {c.name for c in contenders if c.bar}

        def row(impl, mode, **fields):
            r = {**base, "impl": impl, "bar": impl in bars, "mode": mode, "status": "ok", "message": None, "ms": None,
                 "peak_bytes": None, "tflops": None, "gbps": None, "tokens_per_s": None, "error": None, "errors": {}, "error_ref": None,
                 "error_note": None, "config": None, **meta, "timestamp": report.now()}
            r.update(fields)
            emit(r)

        runnable = [(c, m) for c in contenders if c.skip is None for m in _modes(c, case)]
        for c in contenders:
            for m in _modes(c, case) if c.skip is not None else ():
                row(c.name, m, status="skipped", message=c.skip)
        try:
            inputs = module.make_inputs(case, device)
        except Exception as e:
            for c, m in runnable:
                progress.set_postfix_str(f"{case.name} {c.name} {m}", refresh=False)
                progress.update()
                row(c.name, m, status="error", message=f"making inputs: {_describe(e)}")
            free_memory(device)
            continue
        try:
            ref, how = module.reference(case, inputs, device)
        except Exception as e:
            ref, how = None, f"fp64 reference failed: {_describe(e)}"
        free_memory(device)
        results = _time_case(runnable, inputs, ref, device, getattr(module, "compare", compare), progress,
                             lambda c, m: f"{case.name} {c.name} {m}")
        for (c, m), result in zip(runnable, results):
            errors = result.get("errors", {})
            flops = module.flops(case, m)
            moved = module.bytes_read(case) if hasattr(module, "bytes_read") else None
            generated = module.tokens_generated(case) if hasattr(module, "tokens_generated") else None
            row(c.name, m, **result, error=worst(errors), error_ref=how if ref is not None else None,
                error_note=None if ref is not None else how,
                tflops=flops / result["ms"] / 1e9 if flops and result.get("ms") else None,
                gbps=moved / result["ms"] / 1e6 if moved and result.get("ms") else None,
                tokens_per_s=generated / result["ms"] * 1e3 if generated and result.get("ms") else None)
        del inputs, ref
        free_memory(device)
    progress.close()


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.ratios:
        try:
            runs = [report.read_json(path) for path in args.ratios]
        except (OSError, ValueError) as e:  # a missing file, not JSON, not a run's rows
            print(f"python -m vlfast bench --ratios: {e}", file=sys.stderr)
            return 2
        print(report.ratio_table(runs[0], tuple(runs[1:])))
        return 0
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    meta = report.metadata_fields(device)
    print(f"vlfast bench: {', '.join(args.ops)} on {meta['device']} ({size} sizes); torch {meta['torch']}, "
          f"triton {meta['triton']}, vlfast {meta['vlfast']}, git {meta['git_sha'] or 'unknown'}", file=sys.stderr)
    rows = []

    def emit(r):
        rows.append(r)
        if args.json:
            report.write_json(rows, args.json)

    for op in args.ops:
        module = importlib.import_module(f"vlfast.bench.bench_{op}")
        start = len(rows)
        run_op(op, module, device, size, meta, emit)
        print(f"\n{op}\n{report.table(rows[start:])}\n{report.summary(rows[start:])}")
    print(f"\nvlfast / fastest correct peer ({report.CORRECT_RULE}):\n{report.ratio_table(rows)}")
    if args.json:
        report.write_json(rows, args.json)  # also when there are no rows
        print(f"rows written to {args.json}")
    if args.plot:
        why_not = report.plot(rows, args.plot)
        print(why_not or f"plot written to {args.plot}")
    # Peers failing (out of memory, unsupported dtypes) is a result; vlfast failing is not.
    return 1 if any(r["status"] == "error" and r["impl"].startswith("vlfast-") for r in rows) else 0
