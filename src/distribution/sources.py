"""Where a :class:`~distribution.CatalogWatcher` takes its notifications from.

By default a watcher LISTENs on the catalog's own database, on the one connection it holds there
(a :class:`~distribution.catalog.CatalogListener`, over which it also reads the catalog unless the
store reads from a separate read engine): one connection per service on the primary. A watcher
may be given any other source of the same notifications instead, such as a NATS subscription fed
by ``distribution relay`` (:mod:`distribution.fanout`): it then holds no connection to the primary
for them, and reads the catalog (through its store) only for its first snapshot, after a gap, for
changes too large for one message, and to confirm the versions it took from notifications.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from distribution.catalog.notifications import CatalogNotification

__all__ = ["NotificationSource", "NotificationSourceFactory"]


class NotificationSource(Protocol):
    """An open stream of catalog notifications, as :class:`~distribution.catalog.CatalogListener`
    is one.

    A source delivers what it receives while it is open, in the order it received it, and raises
    (a :class:`~distribution.CatalogUnavailableError` or a
    :class:`~distribution.NotificationsUnavailableError`, both ``ConnectionError``) once it may
    have missed something: the watcher then closes it, opens another through its factory, and
    reads the catalog for what it missed.
    """

    def wait(self, timeout: float) -> list[CatalogNotification]:
        """Wait up to ``timeout`` seconds; return the notifications that arrived (maybe none).
        O(notifications)."""
        ...

    def interrupt(self) -> None:
        """Wake the thread blocked in :meth:`wait` (else the next wait), which returns ``[]`` at
        once; the source stays usable. Any thread may call it, even once the source is closed.
        A watcher's :meth:`~distribution.CatalogWatcher.stop` calls it. O(1)."""
        ...

    def close(self) -> None:
        """Stop receiving; release what the source holds. O(1)."""
        ...


#: Opens a :class:`NotificationSource`, or raises when it cannot (the watcher retries, backing
#: off, and polls the catalog meanwhile).
NotificationSourceFactory = Callable[[], NotificationSource]
