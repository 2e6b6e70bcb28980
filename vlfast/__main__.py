"""Command line: `python -m vlfast info [--json]` and `python -m vlfast bench [OP ...] [options]`."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args, rest) -> int:
    from vlfast import _info
    report = _info.collect()
    print(json.dumps(report, indent=2) if args.json else _info.format_report(report))
    return 0


def _bench(args, rest) -> int:
    from vlfast.bench import runner  # matplotlib, peers: imported only for bench
    return runner.main(rest)


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
