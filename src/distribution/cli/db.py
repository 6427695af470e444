"""``distribution db``: the embedded PostgreSQL server (status, start, stop, url, reset), or the
server a URL names (status)."""

from __future__ import annotations

import sys

from distribution.cli.embedded import EmbeddedDatabase
from distribution.cli.errors import EXIT_OK, UsageError
from distribution.cli.session import Session, redact

__all__ = ["cmd_db"]


def _server_lines(session: Session, url: str) -> list[str]:
    """Describe the server at ``url``: its version, and the catalog's (if migrated)."""
    from distribution.migrator import current_revision, head_revision

    with session.open_store(url) as store, store.sa_engine.connect() as connection:
        server = connection.exec_driver_sql("SHOW server_version").scalar()
        revision = current_revision(connection)
        lines = [f"server: PostgreSQL {server}"]
        if revision is None:
            return [*lines, "catalog: not migrated (run 'distribution migrate')"]
        lines.append(f"catalog version: {store.version()}")
        needed = head_revision()
        if revision != needed:
            lines.append(
                f"catalog schema: revision {revision}, this library needs {needed} "
                "(run 'distribution migrate')"
            )
    return lines


def _confirm(session: Session, question: str) -> bool:
    """Ask ``question`` on the terminal; without one, refuse (``--yes`` is the way)."""
    if session.args.yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"{question.rstrip('?')}: pass --yes to confirm (no terminal to ask on)")
    answer = input(f"{question} [y/N] ")
    return answer.strip().lower() in {"y", "yes"}


def cmd_db(session: Session) -> int:
    """``db status``, ``start``, ``stop``, ``url`` and ``reset``: the embedded server."""
    action = session.args.db_command
    external = session.external_url
    if external is not None:
        if action != "status":
            raise UsageError(
                f"db {action} manages the embedded server only, but {session.url_source} "
                "names a database"
            )
        session.print(f"database: {redact(external)} (from {session.url_source})")
        session.print(*_server_lines(session, session.url()))
        return EXIT_OK
    embedded = EmbeddedDatabase()
    if action == "stop":
        if embedded.stop():
            session.print(f"stopped the embedded PostgreSQL server in {embedded.pgdata}")
        else:
            session.print(f"the embedded PostgreSQL server in {embedded.pgdata} is not running")
        return EXIT_OK
    if action == "reset":
        if not _confirm(session, f"delete the embedded catalog and its server's data in {embedded.pgdata}?"):
            session.print("nothing deleted")
            return EXIT_OK
        embedded.reset()
        session.print(
            f"the embedded catalog in {embedded.pgdata} is gone: the next command starts an "
            "empty one"
        )
        return EXIT_OK
    if action == "url":
        session.print(session.url())
        return EXIT_OK
    if action == "start":
        was_running = embedded.status().running
        session.url()
        if was_running:
            session.print("the embedded PostgreSQL server was already running")
        else:
            session.print("started the embedded PostgreSQL server")
    status = embedded.status()
    if not status.running:
        session.print(
            "embedded PostgreSQL server: not running",
            f"folder: {status.pgdata}"
            + ("" if status.initialised else " (not created yet: the next command creates it)"),
        )
        return EXIT_OK
    session.print(
        f"embedded PostgreSQL server: running (pid {status.pid})",
        f"folder: {status.pgdata}",
        f"url: {status.url}",
    )
    if status.url is not None:
        session.print(*_server_lines(session, status.url))
    return EXIT_OK
