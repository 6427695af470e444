"""Named writes: a write sent with a request id is done at most once, however often it is sent.

A write that raises :class:`~distribution.CatalogUnavailableError` has an unknown outcome: the
connection may have dropped after the server committed. Sent again with the same request id, it
is not written twice: its transaction first locks the catalog's metadata row (so a retry racing
its own original, still in flight, waits for it), then looks the id up in the history. Found,
the write is not made again and the original result is returned (after checking that the entry
asked for the same thing, else :class:`~distribution.CatalogRequestMismatchError`); not found,
the write is made and its history entry keeps the id. Ids live as long as their history entry:
a write pruned out of the history window (:meth:`~distribution.CatalogStore.prune_history`) is
forgotten, and its id would write again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from distribution.errors import CatalogInvalidRequestIDError, CatalogRequestMismatchError
from distribution.models import u64_from_db
from distribution.types import MAX_REQUEST_ID_LENGTH

__all__ = ["Request", "check_request_id"]

_BEGIN_REQUEST = (
    "SELECT set_config('distribution.request_id', %s, true), "
    "set_config('distribution.request_digest', %s, true) "
    "FROM distribution_meta FOR UPDATE"
)
# A separate statement from the lock: under READ COMMITTED it sees what the writer it waited
# for committed.
_FIND_REQUEST = (
    "SELECT version, request_digest, digest FROM distribution_history WHERE request_id = %s"
)
def check_request_id(request_id: object) -> None:
    """Refuse a request id the catalog would not keep as given, before anything is sent; O(1).

    TypeError unless a ``str``; :class:`~distribution.CatalogInvalidRequestIDError` unless 1 to
    :data:`~distribution.MAX_REQUEST_ID_LENGTH` printable ASCII characters (``uuid4().hex`` is).

    >>> check_request_id("a b")
    Traceback (most recent call last):
    ...
    distribution.errors.CatalogInvalidRequestIDError: request id must be 1 to 64 printable ASCII characters (no space), got 'a b'
    """
    if not isinstance(request_id, str):
        raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
    if not (
        0 < len(request_id) <= MAX_REQUEST_ID_LENGTH
        and request_id.isascii()
        and request_id.isprintable()
        and " " not in request_id
    ):
        shown = request_id if len(request_id) <= MAX_REQUEST_ID_LENGTH else request_id[:20] + "…"
        raise CatalogInvalidRequestIDError(
            f"request id must be 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters "
            f"(no space), got {shown!r}"
        )


@dataclass(frozen=True, slots=True)
class Request:
    """A named write: its id and the hash of what it asks for (operation and arguments)."""

    request_id: str
    digest: str

    @classmethod
    def of(cls, request_id: str | None, operation: str, parts: Iterable[object]) -> Request | None:
        """The request named ``request_id`` for ``operation`` with ``parts`` (None for None);
        O(size of the parts' reprs). Raises like :func:`check_request_id`."""
        if request_id is None:
            return None
        check_request_id(request_id)
        digest = hashlib.sha256(operation.encode())
        for part in parts:
            digest.update(b"\x00" + repr(part).encode("utf-8", "surrogatepass"))
        return cls(request_id, digest.hexdigest())

    def begin(self, cursor: psycopg.Cursor[Any]) -> tuple[int, int] | None:
        """Open the named write in the cursor's transaction, before its compare-and-set.

        Locks the metadata row, then looks the id up: returns the version (as stored) and the
        route digest the earlier write with this id left, or None when there is none (the write then goes ahead
        and its history entry keeps the id). Raises
        :class:`~distribution.CatalogRequestMismatchError` for an id used by another write.
        One round trip (pipelined: the lookup runs once the lock is held); O(1).
        """
        with cursor.connection.pipeline():
            cursor.execute(_BEGIN_REQUEST, [self.request_id, self.digest])
            cursor.execute(_FIND_REQUEST, [self.request_id])
        row = cursor.fetchone()
        if row is None:
            return None
        version, digest, routes_digest = row
        if digest != self.digest:
            raise CatalogRequestMismatchError(
                f"request id {self.request_id!r} already named the write of catalog version "
                f"{u64_from_db(version)}, which asked for something else: nothing was written"
            )
        # Entries with a request id were written since revision 0004: they hold their digest.
        stored: int = version
        left: int = routes_digest
        return stored, left
