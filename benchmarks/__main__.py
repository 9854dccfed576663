"""Benchmark runner:
`python -m benchmarks run [--suite cls|gen|load|server|fairness|families-gen|families-cls|kernels|overload|accuracy|rank|single|linears|all] [--device cpu|cuda] [--quick] [--out DIR]`.
A suite is a module in SUITES with `run(device: str, quick: bool) -> (result dict, markdown str)`; each
run writes <DIR, default benchmarks/results>/<suite>-<device>-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import write_results

# Add a suite by adding its module here.
SUITES = {
    "cls": "benchmarks.cls",
    "gen": "benchmarks.gen",
    "load": "benchmarks.load",
    "server": "benchmarks.server",
    "fairness": "benchmarks.fairness",
    "families-gen": "benchmarks.families_gen",
    "families-cls": "benchmarks.families_cls",
    "kernels": "benchmarks.kernels",
    "overload": "benchmarks.overload",
    "accuracy": "benchmarks.accuracy",
    "rank": "benchmarks.rank",
    "single": "benchmarks.single",
    "linears": "benchmarks.linears",
}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the server suite's `loraswap serve`)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_suite(name: str, device: str, quick: bool, out: Path | None, write: bool) -> None:
    started, cpu = time.perf_counter(), _cpu_seconds()
    result, markdown = importlib.import_module(SUITES[name]).run(device, quick)
    # CPU time well below wall time x threads means the machine was busy with other work meanwhile.
    result["elapsed"] = {"wall_s": time.perf_counter() - started, "cpu_s": _cpu_seconds() - cpu}
    markdown += "\nSuite ran in {wall_s:.0f} s wall time, {cpu_s:.0f} s CPU time.\n".format(
        **result["elapsed"]
    )
    print(markdown, flush=True)
    if write:
        for path in write_results(name, device, result, markdown, out):
            print(f"wrote {path}", file=sys.stderr)
    print(f"suite {name} took {result['elapsed']['wall_s']:.1f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run suites and write <out>/<suite>-<device>-<date>.json and .md")
    run.add_argument("--suite", choices=[*SUITES, "all"], default="all", help="one suite, or all in turn")
    run.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    run.add_argument("--quick", action="store_true", help="tiny shapes, 1 rep: checks that suites run")
    run.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results)")
    run.add_argument("--no-write", action="store_true", help="print only, write no result files")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # model load reports (the fresh classifier head) are expected here
    hf_logging.disable_progress_bar()
    failed = []
    for name in SUITES if args.suite == "all" else [args.suite]:
        try:
            run_suite(name, args.device, args.quick, args.out, not args.no_write)
        except Exception:  # one broken suite must not lose the others' results in `--suite all`
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"failed suites: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
