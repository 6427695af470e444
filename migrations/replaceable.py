"""Server functions and triggers as replaceable objects, defined in ``sql/`` and applied by revision.

Alembic's cookbook recipe, with the definitions in files rather than in migration scripts:

* ``sql/functions/NAME.sql`` and ``sql/triggers/NAME.sql`` hold each object's newest definition,
  one ``CREATE OR REPLACE`` statement a file.
* ``NAME.REVISION.diff`` beside it is the change that revision made to the file (``git diff``
  output). Reverting the diffs newer than a revision, newest first, gives the definition as of
  that revision, so every revision installs exactly what it always did and a downgrade restores
  exactly what was there before, while each line of SQL is written once.

A migration names the objects it installs: :func:`create` and :func:`drop` for new ones,
:func:`replace` and :func:`restore` for changed ones (the README's "Layout" section shows the
steps to change a function).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path

from alembic import op
from alembic.script import ScriptDirectory

__all__ = ["SQL_FOLDER", "create", "definition", "diff_path", "drop", "replace", "restore"]

#: Where the definitions live: shipped in the package beside the migration scripts.
SQL_FOLDER = Path(__file__).resolve().parent / "sql"

_KINDS = ("functions", "triggers")
_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
# The table a trigger is on: what DROP TRIGGER needs besides the name.
_TRIGGER_TABLE = re.compile(r"CREATE OR REPLACE TRIGGER \w+\s.*?\bON\s+(\w+)", re.DOTALL)


def create(revision: str, *names: str) -> None:
    """Create the named objects as ``revision`` defines them, in the order given."""
    for name in names:
        _execute(definition(name, revision))


def drop(*names: str) -> None:
    """Drop the named objects, in the reverse of the order given (that of :func:`create`)."""
    for name in reversed(names):
        path = _file(name)
        if path.parent.name == "functions":
            _execute(f"DROP FUNCTION {name}")
        else:
            match = _TRIGGER_TABLE.search(path.read_text())
            assert match, f"{path} names no table"
            _execute(f"DROP TRIGGER {name} ON {match.group(1)}")


def replace(revision: str, *names: str) -> None:
    """Replace the named objects by the definitions ``revision`` gives them."""
    for name in names:
        _check_replaced(name, revision)
        _execute(definition(name, revision))


def restore(revision: str, *names: str) -> None:
    """Put back the definitions the named objects had before ``revision`` replaced them."""
    position = _revisions().index(revision)
    assert position > 0, f"{revision} is the first revision: nothing came before it"
    previous = _revisions()[position - 1]
    for name in names:
        _check_replaced(name, revision)
        _execute(definition(name, previous))


def definition(name: str, revision: str) -> str:
    """The SQL that defines ``name`` as of ``revision``.

    >>> "CREATE OR REPLACE FUNCTION distribution_u64(" in definition("distribution_u64", "0001")
    True
    """
    path = _file(name)
    text = path.read_text()
    later = _revisions()[_revisions().index(revision) + 1 :]
    for newer in reversed(later):
        change = diff_path(name, newer)
        if change.is_file():
            text = _revert(text, change.read_text(), change)
    return text


def diff_path(name: str, revision: str) -> Path:
    """The file that holds the change ``revision`` made to the definition of ``name``."""
    path = _file(name)
    return path.with_name(f"{name}.{revision}.diff")


def _check_replaced(name: str, revision: str) -> None:
    """Raise unless ``revision`` kept the change it made to ``name``."""
    if not diff_path(name, revision).is_file():
        raise FileNotFoundError(
            f"revision {revision} replaces {name} but does not say how: keep its change "
            f"with git diff {_file(name)} > {diff_path(name, revision)}"
        )


def _file(name: str) -> Path:
    for kind in _KINDS:
        path = SQL_FOLDER / kind / f"{name}.sql"
        if path.is_file():
            return path
    raise FileNotFoundError(f"no definition of {name} in {SQL_FOLDER}")


@cache
def _revisions() -> tuple[str, ...]:
    """Every revision, oldest first (the history is a single line)."""
    script = ScriptDirectory(str(SQL_FOLDER.parent))
    return tuple(reversed([revision.revision for revision in script.walk_revisions()]))


def _revert(text: str, diff: str, source: Path) -> str:
    """Undo the unified ``diff`` on ``text``: what it added goes, what it removed comes back.

    Each hunk must match ``text`` exactly, or the definitions no longer agree with their history.
    """
    lines = text.splitlines(keepends=True)
    hunks = _hunks(diff)
    # Backwards, so the line numbers of the hunks not yet undone stay right.
    for new_start, removed, added in reversed(hunks):
        at = new_start - 1 if added else new_start
        if lines[at : at + len(added)] != added:
            raise ValueError(f"{source} does not apply to the definition it belongs to")
        lines[at : at + len(added)] = removed
    return "".join(lines)


def _hunks(diff: str) -> list[tuple[int, list[str], list[str]]]:
    """(start line in the new text, lines of the old text, lines of the new text) per hunk."""
    hunks: list[tuple[int, list[str], list[str]]] = []
    lines: Iterator[str] = iter(diff.splitlines(keepends=True))
    for line in lines:
        match = _HUNK.match(line)
        if not match:
            continue  # the header: diff --git, index, ---, +++
        old_count, new_count = int(match.group(2) or "1"), int(match.group(4) or "1")
        removed: list[str] = []
        added: list[str] = []
        while len(removed) < old_count or len(added) < new_count:
            body = next(lines)
            # A blank context line may have lost its space to an editor.
            tag, content = (" ", body) if body in ("\n", "\r\n") else (body[0], body[1:])
            if tag not in " -+":
                # "\\ No newline at end of file": definition files end with one.
                raise ValueError(f"unexpected line in a diff: {body!r}")
            if tag in " -":
                removed.append(content)
            if tag in " +":
                added.append(content)
        hunks.append((int(match.group(3)), removed, added))
    return hunks


def _execute(statement: str) -> None:
    # Straight to psycopg, without parameters: the `%` of RAISE formats is left alone.
    op.get_bind().connection.driver_connection.execute(statement)  # type: ignore[union-attr]
