"""Run the benchmarks and print one table: ``python -m benchmarks [--only NAME] [--quick]``.

Run it from the repository root. Each section is a module exposing ``run(quick: bool) ->
list[Row]``; register a new one in :data:`SECTIONS`. Sections are imported only when selected, so
one whose dependencies are missing does not keep the others from running. Progress goes to
stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence

from benchmarks.harness import Row, print_table, progress

__all__ = ["SECTIONS", "main"]

#: Section name -> module exposing ``run(quick: bool) -> list[Row]``, in report order.
SECTIONS: dict[str, str] = {
    "engine": "benchmarks.bench_engine",
    "catalog": "benchmarks.bench_catalog",
    "watcher": "benchmarks.bench_watcher",
    "fleet": "benchmarks.bench_fleet",
    "scale": "benchmarks.bench_scale",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the arguments, run the selected sections, print their rows as one table."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(SECTIONS),
        metavar="NAME",
        help=f"run only this section (repeatable); one of: {', '.join(SECTIONS)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller sizes and fewer repetitions, for a smoke test",
    )
    args = parser.parse_args(argv)
    selected = [name for name in SECTIONS if not args.only or name in args.only]
    rows: list[Row] = []
    for name in selected:
        begin = time.perf_counter()
        module = importlib.import_module(SECTIONS[name])
        rows += module.run(args.quick)
        progress(f"{name}: done in {time.perf_counter() - begin:.0f} s")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
