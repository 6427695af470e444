"""Writes named by a request id are safe to send again when their outcome is unknown.

The ambiguous failures are real: the store talks to PostgreSQL through a small TCP proxy (a
thread here) that relays the write and its COMMIT, then, once another connection sees the write
committed, closes both sockets instead of relaying the server's reply. The library raises
CatalogUnavailableError although the write committed.
"""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
import pytest

from distribution import (
    MAX_REQUEST_ID_LENGTH,
    CatalogInvalidRequestIDError,
    CatalogRequestMismatchError,
    CatalogUnavailableError,
    CatalogVersionMismatchError,
    RouteDescriptor,
    RouteState,
)
from distribution.catalog import CatalogStore
from distribution.cli import main

BASE = (
    RouteDescriptor(route_id=1, start=b"", end=b"m", group_id=1),
    RouteDescriptor(route_id=2, start=b"m", end=None, group_id=2),
)


class _Proxy:
    """Forwards TCP connections to PostgreSQL; armed, it cuts the first connection that sends
    ``marker`` once: before relaying it (``commit=False``), or after relaying the COMMIT that
    follows it, withholding the server's reply until ``committed()`` holds (``commit=True``)."""

    def __init__(self, upstream: tuple[str, int] | str) -> None:
        self._upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._armed: tuple[bytes, bool, Callable[[], bool]] | None = None
        self._lock = threading.Lock()
        self.cuts = 0
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, name="test-proxy-accept", daemon=True).start()

    def arm(self, marker: bytes, *, commit: bool, committed: Callable[[], bool] = bool) -> None:
        with self._lock:
            self._armed = (marker, commit, committed)

    def url(self, url: str) -> str:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)
        host = f"127.0.0.1:{self.port}"
        query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "host"])
        return urlunsplit(
            parts._replace(netloc=f"{netloc[0]}@{host}" if len(netloc) == 2 else host, query=query)
        )

    def close(self) -> None:
        self._listener.close()
        for sock in self._sockets:
            _close(sock)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if isinstance(self._upstream, str):  # a Unix socket (the embedded server's)
                server = socket.socket(socket.AF_UNIX)
                server.connect(self._upstream)
            else:
                server = socket.create_connection(self._upstream)
            self._sockets += [client, server]
            cut = threading.Event()
            threading.Thread(
                target=self._pump_up, args=(client, server, cut), name="test-proxy-up", daemon=True
            ).start()
            threading.Thread(
                target=self._pump_down,
                args=(server, client, cut),
                name="test-proxy-down",
                daemon=True,
            ).start()

    def _pump_up(self, client: socket.socket, server: socket.socket, cut: threading.Event) -> None:
        seen = False
        committed: Callable[[], bool] | None = None
        while (data := _recv(client)) and not cut.is_set():
            with self._lock:
                armed = self._armed
                if armed is not None and not seen and armed[0] in data:
                    seen = True
                    self._armed = None
                    if not armed[1]:
                        self.cuts += 1
                        cut.set()
                        break
                    committed = armed[2]
            # The COMMIT command itself (not "ON COMMIT" in a statement).
            if seen and committed is not None and b"COMMIT\x00" in data:
                cut.set()  # the reply to the COMMIT is not relayed
                server.sendall(data)
                _wait_for(committed)
                self.cuts += 1
                break
            try:
                server.sendall(data)
            except OSError:  # the server side closed: the other pump ended the connection
                break
        _close(client)
        _close(server)

    def _pump_down(
        self, server: socket.socket, client: socket.socket, cut: threading.Event
    ) -> None:
        while (data := _recv(server)) and not cut.is_set():
            try:
                client.sendall(data)
            except OSError:
                break
        if not cut.is_set():
            _close(client)
            _close(server)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "the write never committed"
        time.sleep(0.02)


@pytest.fixture
def proxy(database_url: str) -> Iterator[_Proxy]:
    parts = urlsplit(database_url)
    socket_folder = dict(parse_qsl(parts.query)).get("host", "")
    proxy = _Proxy(
        str(next(Path(socket_folder).glob(".s.PGSQL.*[0-9]")))
        if socket_folder.startswith("/")
        else (parts.hostname or "127.0.0.1", parts.port or 5432)
    )
    yield proxy
    proxy.close()


@pytest.fixture
def catalog(store: CatalogStore) -> CatalogStore:
    store.save(0, BASE, actor="fixture")
    return store


@pytest.fixture
def proxied(proxy: _Proxy, database_url: str, catalog: CatalogStore) -> Iterator[CatalogStore]:
    store = CatalogStore.from_url(proxy.url(database_url))
    yield store
    store.close()


def _history_rows(database_url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database_url) as connection:
        return connection.execute(
            "SELECT operation, request_id FROM distribution_history ORDER BY version"
        ).fetchall()


def _at_version(database_url: str, version: int) -> Callable[[], bool]:
    def reached() -> bool:
        with psycopg.connect(database_url) as connection:
            count = connection.execute(
                "SELECT count(*) FROM distribution_history WHERE request_id IS NOT NULL"
            ).fetchone()
        return count is not None and count[0] >= 1 and _version(database_url) == version

    return reached


def _version(database_url: str) -> int:
    with CatalogStore.from_url(database_url) as store:
        return store.version()


_WRITES: dict[str, Callable[[CatalogStore, str | None], Any]] = {
    "split": lambda store, rid: store.split_route(1, b"f", 1, actor="ops", request_id=rid),
    "state": lambda store, rid: store.set_route_state(
        2, RouteState.WRITE_FENCED, 1, request_id=rid
    ),
    "save": lambda store, rid: store.save(
        1, [*BASE[:1], RouteDescriptor(3, b"m", None, 3)], request_id=rid
    ),
}
_MARKERS = {
    "split": b"distribution_split_route",
    "state": b"distribution_set_route_state",
    "save": b"distribution_begin_write",
}


@pytest.mark.parametrize("write", sorted(_WRITES))
def test_a_write_that_committed_but_lost_its_reply_is_replayed(
    write: str, proxy: _Proxy, proxied: CatalogStore, catalog: CatalogStore, database_url: str
) -> None:
    proxy.arm(_MARKERS[write], commit=True, committed=_at_version(database_url, 2))
    with pytest.raises(CatalogUnavailableError):
        _WRITES[write](proxied, "req-1")
    assert proxy.cuts == 1
    assert catalog.version() == 2  # it did commit
    written = catalog.snapshot_at(2)
    again = _WRITES[write](proxied, "req-1")
    assert catalog.version() == 2
    if write == "save":
        assert again.version == 2
        assert again.routes == written.routes
    else:
        assert again.version == 2
        expected = [r for r in written.routes if r not in catalog.snapshot_at(1).routes]
        assert list(again.created) == expected
    assert [row[1] for row in _history_rows(database_url)] == [None, "req-1"]
    # The same write with no id is a blind retry: the catalog has moved on.
    with pytest.raises(CatalogVersionMismatchError):
        _WRITES[write](proxied, None)


def test_a_replayed_operation_returns_what_the_original_did(
    catalog: CatalogStore, database_url: str
) -> None:
    first = catalog.split_route(1, b"f", 1, actor="ops", request_id="r")
    assert catalog.split_route(1, b"f", 1, actor="ops", request_id="r") == first
    merged = catalog.merge_routes(
        first.created[0].route_id, first.created[1].route_id, 2, request_id="m"
    )
    assert (
        catalog.merge_routes(
            first.created[0].route_id, first.created[1].route_id, 2, request_id="m"
        )
        == merged
    )
    fenced = catalog.set_route_state(2, RouteState.WRITE_FENCED, 3, request_id="f")
    moved = catalog.move_route(2, 7, 4, request_id="mv")
    assert catalog.set_route_state(2, RouteState.WRITE_FENCED, 3, request_id="f") == fenced
    assert catalog.move_route(2, 7, 4, request_id="mv") == moved
    assert catalog.version() == 5
    assert len(_history_rows(database_url)) == 5


def test_a_write_that_did_not_commit_is_made_by_its_retry(
    proxy: _Proxy, proxied: CatalogStore, catalog: CatalogStore, database_url: str
) -> None:
    proxy.arm(b"distribution_split_route", commit=False)
    with pytest.raises(CatalogUnavailableError):
        proxied.split_route(1, b"f", 1, request_id="req-2")
    assert proxy.cuts == 1
    assert catalog.version() == 1
    result = proxied.split_route(1, b"f", 1, request_id="req-2")
    assert result.version == 2
    assert [r.start for r in result.created] == [b"", b"f"]
    assert _history_rows(database_url)[-1] == ("split_route", "req-2")


@pytest.mark.parametrize(
    "other",
    [
        lambda store: store.split_route(1, b"g", 1, request_id="same"),  # other arguments
        lambda store: store.split_route(1, b"f", 1, actor="x", request_id="same"),  # other actor
        lambda store: store.set_route_state(1, RouteState.WRITE_FENCED, 2, request_id="same"),
        lambda store: store.save(2, BASE, request_id="same"),
    ],
)
def test_an_id_reused_for_another_write_is_refused(
    other: Callable[[CatalogStore], Any], catalog: CatalogStore, database_url: str
) -> None:
    catalog.split_route(1, b"f", 1, request_id="same")
    with pytest.raises(CatalogRequestMismatchError, match="'same'"):
        other(catalog)
    assert catalog.version() == 2
    assert len(_history_rows(database_url)) == 2


def test_concurrent_retries_write_once(catalog: CatalogStore, database_url: str) -> None:
    stores = [CatalogStore.from_url(database_url) for _ in range(6)]
    start = threading.Barrier(len(stores))
    results: list[Any] = []
    errors: list[BaseException] = []

    def send(store: CatalogStore) -> None:
        start.wait()
        try:
            results.append(store.split_route(1, b"f", 1, request_id="race"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(s,), name="test-race") for s in stores]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for store in stores:
            store.close()
    assert errors == []
    assert len(results) == len(stores)
    assert all(result == results[0] for result in results)
    assert catalog.version() == 2
    assert [row[1] for row in _history_rows(database_url)] == [None, "race"]


@pytest.mark.parametrize(
    ("request_id", "error"),
    [
        ("", CatalogInvalidRequestIDError),
        ("x" * (MAX_REQUEST_ID_LENGTH + 1), CatalogInvalidRequestIDError),
        ("a b", CatalogInvalidRequestIDError),
        ("caf\u00e9", CatalogInvalidRequestIDError),
        ("a\x00", CatalogInvalidRequestIDError),
        ("tab\t", CatalogInvalidRequestIDError),
        (7, TypeError),
    ],
)
def test_a_bad_request_id_is_refused_before_anything_is_sent(
    request_id: Any, error: type[Exception]
) -> None:
    # Nothing listens on this port: anything sent would fail with CatalogUnavailableError.
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]
    with CatalogStore.from_url(f"postgresql://nobody@127.0.0.1:{port}/none") as store:
        for write in (
            lambda: store.split_route(1, b"f", 1, request_id=request_id),
            lambda: store.merge_routes(1, 2, 1, request_id=request_id),
            lambda: store.set_route_state(1, RouteState.WRITE_FENCED, 1, request_id=request_id),
            lambda: store.move_route(1, 2, 1, request_id=request_id),
            lambda: store.save(1, BASE, request_id=request_id),
        ):
            with pytest.raises(error):
                write()
    assert issubclass(CatalogInvalidRequestIDError, ValueError)


def test_the_longest_request_id_is_kept(catalog: CatalogStore, database_url: str) -> None:
    longest = "~" * MAX_REQUEST_ID_LENGTH
    catalog.split_route(1, b"f", 1, request_id=longest)
    assert _history_rows(database_url)[-1] == ("split_route", longest)


def test_the_cli_sends_an_ambiguous_write_again_once(
    proxy: _Proxy, catalog: CatalogStore, database_url: str
) -> None:
    proxy.arm(b"distribution_split_route", commit=True, committed=_at_version(database_url, 2))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["--database-url", proxy.url(database_url), "split", "1", "f"])
    assert code == 0, err.getvalue()
    assert proxy.cuts == 1
    assert err.getvalue().count("outcome is unknown") == 1
    assert "split route 1" in out.getvalue()
    assert catalog.version() == 2
    assert [row[0] for row in _history_rows(database_url)] == ["save", "split_route"]
