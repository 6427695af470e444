"""A small benchmark harness: interleaved repetitions, medians, and one plain-text table.

A *case* is a callable that runs a workload once and returns the value it measured (nanoseconds
per key, milliseconds, bytes per route...). Measuring inside the case lets it time only the part
that matters and normalize it (per key, per route). :func:`run_interleaved` warms every case up,
then runs them in rounds, one run of each case per round, rotating the order, so that machine
noise (another process, a thermal throttle, a garbage collection) spreads over every case instead
of biasing the one that ran during it. Report the median, and the p99 where the tail matters::

    from benchmarks.harness import Row, elapsed, run_interleaved, summarize

    results = run_interleaved({"fast": lambda: elapsed(fast) * 1e3,
                               "slow": lambda: elapsed(slow) * 1e3}, repeats=7)
    fast, slow = summarize(results["fast"]), summarize(results["slow"])
    rows = [Row("fast path", "1k", fast.median, "ms", "slow path", slow.median)]
    print_table(rows)

A benchmark *section* is a module exposing ``run(quick: bool) -> list[Row]``; ``python -m
benchmarks`` runs the registered sections and prints all their rows in one table.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TextIO

__all__ = [
    "Case",
    "Measurement",
    "Row",
    "elapsed",
    "format_table",
    "print_table",
    "progress",
    "run_interleaved",
    "summarize",
]

#: A workload run once; returns the value it measured.
Case = Callable[[], float]


def elapsed(workload: Callable[[], object]) -> float:
    """Run ``workload`` once and return the wall-clock seconds it took."""
    start = time.perf_counter()
    workload()
    return time.perf_counter() - start


def progress(message: str) -> None:
    """Report progress on stderr, so that stdout carries only the table."""
    print(message, file=sys.stderr, flush=True)


def run_interleaved(
    cases: dict[str, Case], repeats: int, *, warmup: int = 1, collect: bool = False
) -> dict[str, list[float]]:
    """Run every case ``warmup`` times (discarded), then ``repeats`` interleaved rounds.

    Round ``r`` runs the cases in their order rotated by ``r``. With ``collect``, a full garbage
    collection runs before each measured run, so that one case's garbage is not collected on
    another's time (off by default: with millions of live objects a full collection takes
    seconds; a case can collect itself, outside the part it times). Returns each case's measured
    values, in run order.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    values: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            if collect:
                gc.collect()
            values[name].append(cases[name]())
    return values


@dataclass(frozen=True)
class Measurement:
    """The values one case measured over its repetitions."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        """The median value: the figure to report."""
        return statistics.median(self.values)

    @property
    def p99(self) -> float:
        """The 99th percentile (nearest rank): the tail, where it matters."""
        ordered = sorted(self.values)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were."""
        median = self.median
        return (max(self.values) - min(self.values)) / median if median else 0.0


def summarize(values: Iterable[float]) -> Measurement:
    """A :class:`Measurement` of ``values``."""
    return Measurement(tuple(values))


@dataclass(frozen=True)
class Row:
    """One line of the report: a value, optionally beside a baseline measured in the same run."""

    benchmark: str
    size: str
    value: float
    unit: str
    baseline: str = ""
    baseline_value: float | None = None

    @property
    def ratio(self) -> float | None:
        """``value / baseline_value``, or None without a baseline."""
        if self.baseline_value is None or self.baseline_value == 0:
            return None
        return self.value / self.baseline_value


_HEADERS = ("benchmark", "size", "value", "unit", "baseline", "baseline value", "ratio")


def _number(value: float | None) -> str:
    if value is None:
        return ""
    if value == 0 or abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _ratio(ratio: float | None) -> str:
    if ratio is None:
        return ""
    return f"{ratio:.2f}x" if ratio >= 0.01 else f"{ratio:.2g}x"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned plain-text table (text left-aligned, numbers right-aligned)."""
    cells = [
        (
            row.benchmark,
            row.size,
            _number(row.value),
            row.unit,
            row.baseline,
            _number(row.baseline_value),
            _ratio(row.ratio),
        )
        for row in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]
    numeric = {2, 5, 6}

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if i in numeric else v.ljust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(_HEADERS), rule, *(line(c) for c in cells)])


def print_table(rows: Sequence[Row], file: TextIO | None = None) -> None:
    """Print :func:`format_table` of ``rows`` (to stdout by default)."""
    print(format_table(rows), file=file or sys.stdout)
