"""The catalog's surgical operations: split, merge, state changes and moves.

Each is one compare-and-set write, run as one call to a server-side function (see the
migrations), so it costs one round trip and touches O(1) rows whatever the catalog's size.
Checks run in the contract's order: argument types here, then, on the server, the expected
version, that the route exists, and the operation's own preconditions.

Each takes a ``request_id`` (see :mod:`~distribution.catalog.requests`): a write that raised
:class:`~distribution.CatalogUnavailableError` (outcome unknown) is safe to send again with the
same id and the same arguments; it is made at most once and returns the original result.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from distribution.catalog import statements
from distribution.catalog.requests import Request
from distribution.catalog.transactions import driver_transaction
from distribution.errors import CatalogGroupIDRequiredError, CatalogInvalidActorError
from distribution.models import u64_from_db, u64_to_db
from distribution.types import (
    MAX_ACTOR_BYTES,
    CatalogWriteResult,
    RouteState,
    check_bound,
    check_route_state,
    check_u64,
)

__all__ = ["CatalogOperations", "check_actor"]


class CatalogOperations:
    """The operations of :class:`~distribution.CatalogStore`, over its SQLAlchemy engine."""

    _sa_engine: sa.Engine

    def split_route(
        self,
        route_id: int,
        split_key: bytes,
        expected_version: int,
        *,
        actor: str | None = None,
        request_id: str | None = None,
    ) -> CatalogWriteResult:
        """Split a live route at ``split_key`` into two children; O(1) rows whatever the size.

        The left child ``[start, split_key)`` gets the counter's next id and the right child
        ``[split_key, end)`` the one after; both keep the parent's group and state and name it as
        their parent. Checks, in order: the version, that the route exists
        (:class:`~distribution.CatalogRouteNotFoundError`), that the key is not a boundary
        (:class:`~distribution.CatalogSplitKeyAtBoundaryError`) and lies inside the route
        (:class:`~distribution.CatalogInvalidSplitKeyError`).
        """
        check_u64("route_id", route_id)
        check_bound("split_key", split_key)
        return self._operation(
            "distribution_split_route",
            [u64_to_db(route_id), split_key],
            expected_version,
            actor,
            request_id,
            retired=(route_id,),
        )

    def merge_routes(
        self,
        left_id: int,
        right_id: int,
        expected_version: int,
        *,
        actor: str | None = None,
        request_id: str | None = None,
    ) -> CatalogWriteResult:
        """Merge two adjacent ACTIVE routes of one group into a new route; O(1) rows.

        The new route gets a fresh id and names ``left_id`` as its parent. Checks, in order: the
        version, that both routes exist, ``left.end == right.start``
        (:class:`~distribution.CatalogRoutesNotAdjacentError`), the same group
        (:class:`~distribution.CatalogRouteGroupMismatchError`), both ACTIVE
        (:class:`~distribution.CatalogRouteNotActiveError`).
        """
        check_u64("left_id", left_id)
        check_u64("right_id", right_id)
        return self._operation(
            "distribution_merge_routes",
            [u64_to_db(left_id), u64_to_db(right_id)],
            expected_version,
            actor,
            request_id,
            retired=(left_id, right_id),
        )

    def set_route_state(
        self,
        route_id: int,
        state: RouteState,
        expected_version: int,
        *,
        actor: str | None = None,
        request_id: str | None = None,
    ) -> CatalogWriteResult:
        """Move a route through the cutover lifecycle; O(1) rows.

        Allowed transitions (anything else raises
        :class:`~distribution.CatalogInvalidStateTransitionError`):

        * ACTIVE → WRITE_FENCED (fence);
        * WRITE_FENCED → ACTIVE (lift the fence), MIGRATING_SOURCE or MIGRATING_TARGET;
        * MIGRATING_SOURCE or MIGRATING_TARGET → ACTIVE (cutover done) or WRITE_FENCED (back off).

        The route keeps its id; ``created`` holds its new descriptor and ``retired`` is empty.
        """
        check_u64("route_id", route_id)
        state = check_route_state(state)
        return self._operation(
            "distribution_set_route_state",
            [u64_to_db(route_id), int(state)],
            expected_version,
            actor,
            request_id,
            retired=(),
        )

    def move_route(
        self,
        route_id: int,
        group_id: int,
        expected_version: int,
        *,
        actor: str | None = None,
        request_id: str | None = None,
    ) -> CatalogWriteResult:
        """Reassign a WRITE_FENCED route to another group (fence, copy, move, unfence); O(1) rows.

        Raises :class:`~distribution.CatalogRouteNotFencedError` unless the route is fenced.
        """
        check_u64("route_id", route_id)
        check_u64("group_id", group_id)
        if group_id == 0:
            raise CatalogGroupIDRequiredError(
                "catalog group id is required: cannot move to group 0"
            )
        return self._operation(
            "distribution_move_route",
            [u64_to_db(route_id), u64_to_db(group_id)],
            expected_version,
            actor,
            request_id,
            retired=(),
        )

    def _operation(
        self,
        function: str,
        arguments: list[Any],
        expected_version: int,
        actor: str | None,
        request_id: str | None,
        *,
        retired: tuple[int, ...],
    ) -> CatalogWriteResult:
        """Run one server-side catalog operation: a single round trip, whatever the size (two
        for a named write, see :mod:`~distribution.catalog.requests`)."""
        check_u64("expected_version", expected_version)
        check_actor(actor)
        request = Request.of(request_id, function, [*arguments, expected_version, actor])
        with driver_transaction(self._sa_engine) as cursor:
            done = None if request is None else request.begin(cursor)
            if done is None:
                rows = cursor.execute(
                    statements.operation(function),
                    [*arguments, u64_to_db(expected_version), actor],
                ).fetchall()
            else:
                # Written before: the routes that write opened are its result.
                rows = cursor.execute(statements.ROUTES_OPENED_AT, [done[0]]).fetchall()
        return CatalogWriteResult(
            version=u64_from_db(rows[0][0]),
            created=statements.stored_descriptors([row[1:] for row in rows]),
            retired=retired,
        )


def check_actor(actor: object) -> None:
    """Refuse an actor the catalog would not store as given, before anything is sent.

    TypeError unless a ``str`` or None; :class:`~distribution.CatalogInvalidActorError` for more
    than :data:`~distribution.MAX_ACTOR_BYTES` bytes of UTF-8, for text that is not valid UTF-8
    (a lone surrogate) and for a NUL character (PostgreSQL text cannot hold one). O(1) for an
    actor too long by its length alone, else O(len(actor)).

    >>> check_actor("ops\\udcff")
    Traceback (most recent call last):
    ...
    distribution.errors.CatalogInvalidActorError: actor is not valid UTF-8: surrogates not allowed at character 3
    """
    if actor is None:
        return
    if not isinstance(actor, str):
        raise TypeError(f"actor must be a str, got {type(actor).__name__}")
    # Each character is at least one byte: a long actor is refused before it is encoded.
    if len(actor) > MAX_ACTOR_BYTES:
        raise _actor_too_long(f"{len(actor):,} characters")
    try:
        size = len(actor.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise CatalogInvalidActorError(
            f"actor is not valid UTF-8: {exc.reason} at character {exc.start}"
        ) from None
    if size > MAX_ACTOR_BYTES:
        raise _actor_too_long(f"{size:,} bytes of UTF-8")
    nul = actor.find("\x00")
    if nul >= 0:
        raise CatalogInvalidActorError(
            f"actor holds a NUL character (at character {nul}), which the catalog cannot store"
        )


def _actor_too_long(size: str) -> CatalogInvalidActorError:
    return CatalogInvalidActorError(
        f"actor is {size} long: actors are at most {MAX_ACTOR_BYTES} bytes of UTF-8 "
        "(MAX_ACTOR_BYTES)"
    )
