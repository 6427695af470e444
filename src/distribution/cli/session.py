"""One run of a ``distribution`` command: its arguments, its streams, and the catalog it works on."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from distribution.catalog import CatalogStore
from distribution.cli.embedded import EmbeddedDatabase
from distribution.cli.errors import UsageError
from distribution.cli.parser import default_actor
from distribution.database import DATABASE_URL_ENV, sqlalchemy_url
from distribution.types import CatalogSnapshot

__all__ = ["Session", "redact"]

_CONNECT_TIMEOUT_SECONDS = 10


def redact(url: str) -> str:
    """Return ``url`` with its password hidden.

    >>> redact("postgresql://app:secret@db.example/catalog")
    'postgresql://app:***@db.example/catalog'
    """
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


class Session:
    """One run of a command: its arguments, its streams, and the catalog it works on.

    The database is resolved on first use: ``--database-url``, else ``$DISTRIBUTION_DATABASE_URL``,
    else the embedded server, started (and migrated) on demand.
    """

    def __init__(
        self, args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.args = args
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self._url: str | None = None
        self._store: CatalogStore | None = None

    @property
    def external_url(self) -> str | None:
        """The database URL given by option or environment, if any.

        A variable that is set but empty is refused (``UsageError``): it is an unset shell
        variable far more often than a request for the embedded server.
        """
        url: str | None = getattr(self.args, "database_url", None)
        if url is not None:
            return url
        url = os.environ.get(DATABASE_URL_ENV)
        if url is not None and not url.strip():
            raise UsageError(
                f"${DATABASE_URL_ENV} is set but empty: set it to the catalog's URL, or unset it "
                "to use the embedded server"
            )
        return url

    @property
    def url_source(self) -> str:
        """Where the database URL comes from, for messages."""
        if getattr(self.args, "database_url", None):
            return "--database-url"
        if os.environ.get(DATABASE_URL_ENV):
            return f"${DATABASE_URL_ENV}"
        return "the embedded server"

    def url(self, *, migrated: bool = True) -> str:
        """The catalog database's URL; starts the embedded server if it is the one, and migrates
        it unless ``migrated`` is False."""
        if self._url is None and not migrated and self.external_url is None:
            return EmbeddedDatabase().start()
        if self._url is None:
            url = self.external_url
            if url is not None:
                try:
                    sqlalchemy_url(url)
                except Exception as exc:
                    raise UsageError(f"invalid database URL {redact(url)!r}: {exc}") from None
            else:
                url = EmbeddedDatabase().start()
                from distribution.migrator import migrate

                migrate(url)
            self._url = url
        return self._url

    def open_store(self, url: str | None = None) -> CatalogStore:
        """Open a new CatalogStore on ``url`` (default: the session's database)."""
        url = url or self.url()
        from sqlalchemy.engine import make_url

        connect_args: dict[str, Any] = {"application_name": "distribution-cli"}
        if "connect_timeout" not in make_url(url).query:
            connect_args["connect_timeout"] = _CONNECT_TIMEOUT_SECONDS
        return CatalogStore.from_url(url, connect_args=connect_args)

    def store(self) -> CatalogStore:
        """The session's CatalogStore, opened once."""
        if self._store is None:
            self._store = self.open_store()
        return self._store

    def snapshot(self, at: int | None = None) -> CatalogSnapshot:
        """The catalog now, or as of version ``at``."""
        store = self.store()
        return store.snapshot() if at is None else store.snapshot_at(at)

    def actor(self) -> str:
        """Who asks, for the audit trail: ``--actor``, else the OS user name."""
        actor: str | None = getattr(self.args, "actor", None)
        return actor or default_actor()

    def print(self, *lines: str) -> None:
        """Print lines on stdout."""
        for line in lines:
            print(line, file=self.out)

    def note(self, message: str) -> None:
        """Print a status line on stderr (it never mixes with the data on stdout)."""
        print(message, file=self.err, flush=True)

    def close(self) -> None:
        """Close the store, if one was opened."""
        if self._store is not None:
            self._store.close()
            self._store = None
