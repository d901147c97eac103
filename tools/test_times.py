"""Per-test-file times of two pytest runs, before and after: ``python tools/test_times.py BEFORE.xml AFTER.xml``.

Each file is a JUnit XML report (``python -m pytest --junitxml=FILE``). The table lists, per test
file, the tests counted and the seconds its tests took in each run (pytest's per-test time: set-up,
call and tear-down, so a shared fixture is charged to the first test that needs it), their ratio, and
totals. ``--wall-before S`` / ``--wall-after S`` add the runs' wall-clock times (the ``wall`` line
of a log, or ``time``'s real seconds).

With pytest-xdist the tests of one run overlap in time across workers, so their times add up to more
than the run's wall-clock time; each column is a sum over tests, and the wall-clock line says what a
person waited. Those sums also grow when workers share the machine's cores: compare per-file sums of
runs made the same way, and wall times of runs on an equally quiet machine.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path


def file_of(case: ET.Element) -> str:
    """The test file of a ``<testcase>``: ``classname`` is ``tests.test_x`` or ``tests.test_x.TestClass``."""
    file = case.get("file")
    if file:
        return file
    parts = (case.get("classname") or "?").split(".")
    while len(parts) > 1 and not parts[-1].startswith("test_") and parts[-1][:1].isupper():
        parts.pop()  # a test class
    return "/".join(parts) + ".py"


def read(path: Path) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per file: the time of each test case, and the outcomes counted (passed, failed, error, skipped)."""
    times: dict[str, list[float]] = defaultdict(list)
    outcomes: dict[str, int] = defaultdict(int)
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        times[file_of(case)].append(float(case.get("time") or 0.0))
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        for kind in kinds or {"passed"}:
            outcomes[kind] += 1
    return times, outcomes


def suite_times(path: Path) -> float | None:
    """The ``time`` pytest writes on ``<testsuite>`` (its own wall clock for the session), if any."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    values = [float(s.get("time")) for s in suites if s.get("time")]
    return max(values) if values else None


def ratio(before: float, after: float) -> str:
    return f"{after / before:.2f}" if before > 0 else "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--wall-before", type=float, help="wall-clock seconds of the first run")
    parser.add_argument("--wall-after", type=float, help="wall-clock seconds of the second run")
    parser.add_argument("--sort", choices=("before", "after", "name"), default="before", help="row order (default: slowest before first)")
    args = parser.parse_args(argv)

    before, outcomes_before = read(args.before)
    after, outcomes_after = read(args.after)
    files = sorted(set(before) | set(after))
    key = {"before": lambda f: -sum(before.get(f, [])), "after": lambda f: -sum(after.get(f, [])), "name": lambda f: f}[args.sort]
    files.sort(key=key)

    width = max([len(f) for f in files] + [len("total")])
    header = f"{'test file':<{width}}  {'tests':>9}  {'before s':>9}  {'after s':>9}  {'after/before':>12}"
    print(header)
    print("-" * len(header))
    for f in files:
        b, a = before.get(f, []), after.get(f, [])
        count = f"{len(b)}" if len(b) == len(a) else f"{len(b)}->{len(a)}"
        print(f"{f:<{width}}  {count:>9}  {sum(b):>9.1f}  {sum(a):>9.1f}  {ratio(sum(b), sum(a)):>12}")
    print("-" * len(header))
    nb, na = sum(map(len, before.values())), sum(map(len, after.values()))
    sb, sa = sum(map(sum, before.values())), sum(map(sum, after.values()))
    count = f"{nb}" if nb == na else f"{nb}->{na}"
    print(f"{'sum of test times':<{width}}  {count:>9}  {sb:>9.1f}  {sa:>9.1f}  {ratio(sb, sa):>12}")
    wb = args.wall_before if args.wall_before is not None else suite_times(args.before)
    wa = args.wall_after if args.wall_after is not None else suite_times(args.after)
    if wb is not None or wa is not None:
        show = lambda w: f"{w:>9.1f}" if w is not None else f"{'?':>9}"  # noqa: E731
        label = "wall clock" + ("" if args.wall_before is not None or args.wall_after is not None else " (junit)")
        print(f"{label:<{width}}  {'':>9}  {show(wb)}  {show(wa)}  {ratio(wb, wa) if wb and wa else '-':>12}")
    print()
    for name, outcomes in (("before", outcomes_before), ("after", outcomes_after)):
        print(f"{name}: " + ", ".join(f"{n} {k}" for k, n in sorted(outcomes.items())))
    print("Each column sums pytest's per-test times (set-up + call + tear-down). With pytest-xdist the workers")
    print("run tests at the same time, so a run's sum exceeds its wall clock, and tests sharing the cores each")
    print("take longer than they would alone: the wall-clock line is what a person waits.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
