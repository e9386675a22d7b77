"""Fuzz the untrusted-input readers (GGUF, recipe TOML, recipe tables) for a time budget.

    python bench/fuzz.py [--seconds 60] [--batch 500]

Runs the hypothesis properties of tests/test_fuzz.py in rounds of `--batch` fresh random
examples, round-robin over the targets, until the budget is spent; stops at the first
failure and prints hypothesis's minimal failing example. Prints one table: target,
examples, seconds, result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import test_fuzz  # noqa: E402 (the properties live with the tests)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    done = {name: [0, 0.0, "ok"] for name in test_fuzz.TARGETS}
    deadline = time.monotonic() + args.seconds
    failed = False
    while time.monotonic() < deadline and not failed:
        for name, (strategy, check) in test_fuzz.TARGETS.items():
            start = time.monotonic()
            try:
                test_fuzz.fuzzed(strategy, check, max_examples=args.batch)()
            except Exception as exc:  # hypothesis re-raises the minimal failing example
                done[name][2] = f"FAILED: {type(exc).__name__}: {exc}"[:200]
                failed = True
            done[name][0] += args.batch
            done[name][1] += time.monotonic() - start
            if failed or time.monotonic() >= deadline:
                break
    print(f"| {'target':<13} | {'examples':>8} | {'seconds':>7} | result")
    print(f"|{'-' * 15}|{'-' * 9}:|{'-' * 8}:|--------")
    for name, (examples, seconds, result) in done.items():
        print(f"| {name:<13} | {examples:>8} | {seconds:>7.1f} | {result}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
