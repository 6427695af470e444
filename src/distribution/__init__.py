"""distribution: the route catalog of a range-sharded key-value system, kept in PostgreSQL.

Layers, each importing only those above it:

* ``types``, ``errors``, ``codec``, ``bulk``, ``table`` (with ``_lookup`` in C or ``_pylookup``),
  ``engine``: the pure core, no SQL;
* ``models``, ``database``, ``migrator`` (running the Alembic ``migrations``), ``catalog``: the
  durable catalog;
* ``watcher``: mirrors the catalog into an Engine;
* ``cli``: the ``distribution`` command.

The durable layers' names load on first use (``distribution.CatalogStore``, say), so that a
service that only routes keys imports no SQL library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from distribution import errors
from distribution.codec import (
    catalog_next_route_id_key,
    catalog_route_id_from_key,
    catalog_route_key,
    catalog_version_key,
    decode_catalog_next_route_id,
    decode_catalog_route_entry,
    decode_catalog_version,
    decode_route_descriptor,
    encode_catalog_next_route_id,
    encode_catalog_version,
    encode_route_descriptor,
    is_catalog_route_key,
    next_route_id_floor,
    route_hash,
    routes_digest,
)
from distribution.engine import Engine
from distribution.errors import *  # noqa: F403  (the names of errors.__all__)
from distribution.types import (
    MAX_ACTOR_BYTES,
    MAX_REQUEST_ID_LENGTH,
    MAX_ROUTE_KEY_BYTES,
    ROUTE_STATES,
    UINT64_MAX,
    CatalogChange,
    CatalogChangeSet,
    CatalogHead,
    CatalogHistoryEntry,
    CatalogSnapshot,
    CatalogWriteResult,
    Route,
    RouteDescriptor,
    RouteState,
    validate_route_descriptor,
)

if TYPE_CHECKING:
    from distribution.catalog import (
        CatalogListener,
        CatalogNotification,
        CatalogStore,
        ensure_catalog_snapshot,
    )
    from distribution.migrator import migrate
    from distribution.watcher import CatalogWatcher, run_catalog_watcher

#: Names whose modules load SQLAlchemy, psycopg and Alembic: imported on first use, so that a
#: program using only the pure core (types, errors, codec, engine) does not pay for them.
_SQL_NAMES = {
    "CatalogListener": "distribution.catalog",
    "CatalogNotification": "distribution.catalog",
    "CatalogStore": "distribution.catalog",
    "ensure_catalog_snapshot": "distribution.catalog",
    "migrate": "distribution.migrator",
    "CatalogWatcher": "distribution.watcher",
    "run_catalog_watcher": "distribution.watcher",
}

__all__ = [
    "MAX_ACTOR_BYTES",
    "MAX_REQUEST_ID_LENGTH",
    "MAX_ROUTE_KEY_BYTES",
    "ROUTE_STATES",
    "UINT64_MAX",
    "CatalogChange",
    "CatalogChangeSet",
    "CatalogHead",
    "CatalogHistoryEntry",
    "CatalogListener",
    "CatalogNotification",
    "CatalogSnapshot",
    "CatalogStore",
    "CatalogWatcher",
    "CatalogWriteResult",
    "Engine",
    "Route",
    "RouteDescriptor",
    "RouteState",
    "catalog_next_route_id_key",
    "catalog_route_id_from_key",
    "catalog_route_key",
    "catalog_version_key",
    "decode_catalog_next_route_id",
    "decode_catalog_route_entry",
    "decode_catalog_version",
    "decode_route_descriptor",
    "encode_catalog_next_route_id",
    "encode_catalog_version",
    "encode_route_descriptor",
    "ensure_catalog_snapshot",
    "is_catalog_route_key",
    "migrate",
    "next_route_id_floor",
    "route_hash",
    "routes_digest",
    "run_catalog_watcher",
    "validate_route_descriptor",
]
__all__ += errors.__all__


def __getattr__(name: str) -> Any:
    module = _SQL_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SQL_NAMES})
