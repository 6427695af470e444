"""A service's start-up: the Engine and the durable catalog made to agree."""

from __future__ import annotations

from distribution.catalog.store import CatalogStore
from distribution.engine import Engine
from distribution.errors import (
    CatalogStoreRequiredError,
    CatalogVersionMismatchError,
    EngineRequiredError,
)
from distribution.types import CatalogSnapshot, RouteDescriptor

__all__ = ["check_catalog_and_engine", "ensure_catalog_snapshot"]


def check_catalog_and_engine(catalog: object, engine: object) -> tuple[CatalogStore, Engine]:
    """Refuse a missing catalog store or Engine with the library's errors, a mistyped one with
    TypeError (shared by everything that takes the two)."""
    if catalog is None:
        raise CatalogStoreRequiredError("catalog store is required")
    if engine is None:
        raise EngineRequiredError("engine is required")
    if not isinstance(catalog, CatalogStore):
        raise TypeError(f"catalog must be a CatalogStore, got {type(catalog).__name__}")
    if not isinstance(engine, Engine):
        raise TypeError(f"engine must be an Engine, got {type(engine).__name__}")
    return catalog, engine


def ensure_catalog_snapshot(catalog: CatalogStore | None, engine: Engine | None) -> CatalogSnapshot:
    """Make the Engine and the durable catalog agree at start-up, and return the catalog.

    An empty catalog (version 0, no routes) is seeded from the Engine's routes in key order, with
    ids 1, 2, 3, … (group and state kept, parent 0), as version 1. An existing catalog is left
    alone. When two services seed at once, one wins and the other adopts the winner's catalog,
    read from the primary (a store's read engine, a standby, may not have it yet). Either way the
    result is applied to the Engine.
    """
    catalog, engine = check_catalog_and_engine(catalog, engine)
    snapshot = catalog.snapshot()
    if snapshot.version == 0 and not snapshot.routes:
        seed = [
            RouteDescriptor(
                route_id=route_id,
                start=route.start,
                end=route.end,
                group_id=route.group_id,
                state=route.state,
            )
            for route_id, route in enumerate(engine.stats(), start=1)
        ]
        try:
            snapshot = catalog.save(0, seed, actor="ensure_catalog_snapshot")
        except CatalogVersionMismatchError:
            snapshot = catalog.primary.snapshot()
    engine.apply_snapshot(snapshot)
    return snapshot
