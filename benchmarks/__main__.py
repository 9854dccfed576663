"""Benchmark runner: `python -m benchmarks run --suite cls [--device cpu|cuda] [--quick]`.
A suite is a module in SUITES with `run(device: str, quick: bool) -> (result dict, markdown str)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from benchmarks.common import write_results

# Add a suite by adding its module here (e.g. "gen": "benchmarks.gen").
SUITES = {"cls": "benchmarks.cls"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one suite and write benchmarks/results/<suite>-<device>-<date>.*")
    run.add_argument("--suite", choices=sorted(SUITES), required=True)
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run.add_argument("--quick", action="store_true", help="small shapes and few repetitions (< 60 s)")
    run.add_argument("--no-write", action="store_true", help="print only, write no result files")
    args = parser.parse_args(argv)
    suite = importlib.import_module(SUITES[args.suite])
    result, markdown = suite.run(args.device, args.quick)
    print(markdown)
    if not args.no_write:
        for path in write_results(args.suite, args.device, result, markdown):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
