"""Mutation fuzzer for the parser and binder: ``python -m benchmarks.fuzz_campaign --count 20000``
(from the checkout's root).

The mutations and the invariant they check are tests/fuzzing.py's, shared with tests/test_fuzz.py
(which runs 300 inputs); this script runs a long campaign and prints what it found.
"""
from __future__ import annotations

import argparse
import sys

try:
    from tests.fuzzing import Report, campaign
except ModuleNotFoundError as exc:  # run as a file, the checkout's root is not on the path
    if exc.name != "tests":
        raise
    sys.exit("run it from the checkout's root: python -m benchmarks.fuzz_campaign [--count N]")


def print_report(report: Report, seed: int) -> None:
    print(f"fuzz campaign: {report.count:,} inputs, seed {seed}, {report.seconds:.1f} s, "
          f"{report.count / max(report.seconds, 1e-9):.0f} inputs/s")
    print("\n| mutation | inputs | mean ms |")
    print("|---|---:|---:|")
    for kind, n in sorted(report.per_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {n:,} | {1000 * report.per_kind_seconds[kind] / n:.1f} |")
    print(f"\ninputs with a failure: {report.outcomes['failed']:,}")
    print(f"distinct failures: {len(report.failures)}")
    for key, (n, f) in sorted(report.failures.items(), key=lambda kv: -kv[1][0]):
        print(f"\n## {key}  ({n:,} times; e.g. from {f.kind})")
        print(f"input ({len(f.text):,} chars): {f.text[:300]!r}")
        if f.detail:
            print("\n".join("    " + line for line in f.detail.strip().splitlines()[-12:]))
    print(f"\ninputs over 1 s: {len(report.slow)}")
    for seconds, kind, text in sorted(report.slow, reverse=True)[:15]:
        print(f"  {seconds:6.2f} s  {kind:12s} {text!r}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Mutation fuzzer for the parser and binder.")
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang", type=float, default=20.0, help="seconds before an input is a hang")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    import warnings

    import torch

    torch.set_num_threads(1)  # one core: the machine is shared

    warnings.simplefilter("ignore")
    report = campaign(args.count, args.seed, hang_s=args.hang, progress=not args.quiet)
    print_report(report, args.seed)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
