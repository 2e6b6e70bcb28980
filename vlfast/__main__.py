"""Command line: `python -m vlfast info [--json]` and `python -m vlfast bench [OP ...] [options]`."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path


def _info(args, rest) -> int:
    from vlfast import _info
    report = _info.collect()
    print(json.dumps(report, indent=2) if args.json else _info.format_report(report))
    return 0


def _benchmarks_package():
    """Import benchmarks/ from the source checkout; it ships beside the package, not in a wheel."""
    import vlfast
    root = Path(vlfast.__file__).resolve().parent.parent / "benchmarks"
    if not (root / "runner.py").is_file():
        raise SystemExit(f"vlfast bench: no benchmarks/ folder at {root}. The benchmarks live in the source "
                         "checkout, not in the installed package: clone the repository and "
                         "`pip install -e .` there, then run `python -m vlfast bench` again.")
    if "benchmarks" not in sys.modules:
        # By path rather than via sys.path, so the checkout's other folders (tests/) shadow nothing.
        spec = importlib.util.spec_from_file_location("benchmarks", root / "__init__.py",
                                                      submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["benchmarks"] = module
        spec.loader.exec_module(module)
    return importlib.import_module("benchmarks.runner")


def _bench(args, rest) -> int:
    return _benchmarks_package().main(rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, and which implementations can run (and why not)")
    info.add_argument("--json", action="store_true", help="print the report as JSON")
    info.set_defaults(func=_info)
    # The benchmark runner owns its options (`bench --help` lists them): they pass through untouched.
    bench = sub.add_parser("bench", add_help=False, help="time vlfast against its peers (see bench --help)")
    bench.set_defaults(func=_bench)
    args, rest = parser.parse_known_args(argv)
    if rest and args.func is not _bench:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args, rest)


if __name__ == "__main__":
    sys.exit(main())
