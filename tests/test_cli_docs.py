"""docs/cli.md runs as printed: its tour, command by command, on a fresh embedded catalog.

Each ``console`` block of the document holds commands (``$ distribution …``), each followed by
what it prints (stdout and stderr, as a terminal shows them) and, when it fails, a line
``# exit code N``. The test runs every command in order, with a new ``DISTRIBUTION_DATA_DIR``,
and compares. Each command line goes through the entry point the installed ``distribution``
script calls, in this process (a new interpreter per command would cost seconds each). Only what
differs from run to run is normalised: times, process ids, latencies and key counts of the demo,
the server's minor version and the data folder.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

from distribution.cli import main
from distribution.cli.embedded import EmbeddedDatabase

pytestmark = pytest.mark.slow

DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
#: The data folder the document shows.
DOCUMENTED_DATA_DIR = "/tmp/distribution-docs"
#: The user the document's commands ran as (the audit trail's default actor).
DOCUMENTED_USER = "ops"

_EXIT_CODE = re.compile(r"# exit code (\d+)")
_VARYING = [
    (re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"pid \d+"), "pid <pid>"),
    (re.compile(r"PostgreSQL (\d+)\.\d+"), r"PostgreSQL \1.<minor>"),
    # The socket's folder: the data folder, or a runtime folder when that path is too long.
    (re.compile(r"host=\S+"), "host=<socket folder>"),
    (re.compile(r"\d+\.\d ms"), "<ms> ms"),
    (re.compile(r"routed [\d,]+ keys \([\d,]+ on"), "routed <n> keys (<n> on"),
    (re.compile(r"finished in [\d.]+ s"), "finished in <s> s"),
]


class Step(NamedTuple):
    """One command of the tour, what it prints, and its exit code."""

    command: str
    output: str
    exit_code: int


def tour(text: str) -> list[Step]:
    """The commands of the document's ``console`` blocks, in order."""
    steps: list[Step] = []
    for block in re.findall(r"^```console\n(.*?)^```$", text, flags=re.S | re.M):
        command: str | None = None
        lines: list[str] = []
        code = 0
        for line in [*block.splitlines(), "$ "]:
            if line.startswith("$ "):
                if command is not None:
                    steps.append(Step(command, "\n".join(lines).strip("\n"), code))
                command, lines, code = line[2:], [], 0
                continue
            match = _EXIT_CODE.fullmatch(line)
            if match:
                code = int(match.group(1))
            else:
                lines.append(line)
    return steps


def normalise(output: str, data_dir: str) -> str:
    """``output`` with what varies from run to run replaced by placeholders."""
    output = output.replace(data_dir, DOCUMENTED_DATA_DIR)
    for pattern, replacement in _VARYING:
        output = pattern.sub(replacement, output)
    return output


@contextlib.contextmanager
def documented_environment(data_dir: Path, cwd: Path) -> Iterator[None]:
    """The environment the document's commands ran in: its data folder, user, time zone, cwd."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("DISTRIBUTION_")]:
        del os.environ[key]
    os.environ.update(
        DISTRIBUTION_DATA_DIR=str(data_dir),
        USER=DOCUMENTED_USER,
        LOGNAME=DOCUMENTED_USER,
        TZ="UTC",
    )
    time.tzset()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(previous)
        os.environ.clear()
        os.environ.update(saved)
        time.tzset()


def run(command: str) -> tuple[str, int]:
    """Run one command line of the tour through the command's entry point, as the installed
    ``distribution`` script does, and return what a terminal shows (stdout and stderr, in order)
    and the exit code (of the last command of a pipeline, all of which must succeed)."""
    stdin: str | None = None
    shown = io.StringIO()
    code = 0
    for part in command.split(" | "):
        argv = shlex.split(part)
        assert argv[0] == "distribution", part
        out = io.StringIO()
        saved_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin or "")
        try:
            # stdout goes on to the next command of a pipeline, else to the terminal.
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(shown):
                code = main(argv[1:])
        finally:
            sys.stdin = saved_stdin
        stdin = out.getvalue()
        if code:
            break
    shown.write(stdin or "")
    return shown.getvalue().rstrip("\n"), code


def test_the_tour_parses() -> None:
    steps = tour(DOCUMENT.read_text(encoding="utf-8"))
    assert len(steps) >= 30
    assert all(step.command.startswith("distribution ") for step in steps)
    assert any(step.exit_code for step in steps)


def test_the_tour_runs_as_printed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    work = tmp_path / "work"
    work.mkdir()
    try:
        with documented_environment(data_dir, work):
            for step in tour(DOCUMENT.read_text(encoding="utf-8")):
                output, code = run(step.command)
                assert (normalise(output, str(data_dir)), code) == (
                    normalise(step.output, DOCUMENTED_DATA_DIR),
                    step.exit_code,
                ), f"$ {step.command}"
    finally:
        EmbeddedDatabase(data_dir).stop()
