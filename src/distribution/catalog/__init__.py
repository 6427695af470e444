"""The durable route catalog in PostgreSQL: :class:`CatalogStore` and ``ensure_catalog_snapshot``.

The package's modules are its layers, each importing only those listed before it:

* ``transactions``: one SQLAlchemy ``Connection`` per transaction, its isolation level and
  read-only mode as execution options, every database error translated;
* ``statements``: the SQL the client sends (SQLAlchemy Core over the mapped tables; text on the
  measured hot paths), the decoding of what comes back, and the head read in one statement;
* ``notifications``: the NOTIFY payload and the listening connection;
* ``fleet``: the watchers' roll call over NOTIFY (or NATS), and the barrier :func:`wait_applied`;
* ``diff``: what a save sends, against the routes the store already knows;
* ``operations``: split, merge, state changes and moves, one server-side call each;
* ``store``: :class:`CatalogStore`, its reads and saves;
* ``seeding``: ``ensure_catalog_snapshot``, a service's start-up.
"""

from __future__ import annotations

from distribution.catalog.fleet import (
    FLEET_CHANNEL,
    BarrierResult,
    FleetReport,
    WatcherStatus,
    roll_call,
    wait_applied,
)
from distribution.catalog.notifications import (
    NOTIFY_CHANNEL,
    CatalogListener,
    CatalogNotification,
    parse_notification,
)
from distribution.catalog.seeding import check_catalog_and_engine, ensure_catalog_snapshot
from distribution.catalog.store import (
    DEFAULT_CHANGES_LIMIT,
    DEFAULT_HISTORY_VERSIONS,
    CatalogStore,
)

__all__ = [
    "DEFAULT_CHANGES_LIMIT",
    "DEFAULT_HISTORY_VERSIONS",
    "FLEET_CHANNEL",
    "NOTIFY_CHANNEL",
    "BarrierResult",
    "CatalogListener",
    "CatalogNotification",
    "CatalogStore",
    "FleetReport",
    "WatcherStatus",
    "check_catalog_and_engine",
    "ensure_catalog_snapshot",
    "parse_notification",
    "roll_call",
    "wait_applied",
]
