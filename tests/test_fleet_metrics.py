"""A watcher's Prometheus metrics, scraped over HTTP and parsed by prometheus_client's own parser."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import psycopg
from prometheus_client.parser import text_string_to_metric_families
from standby import free_port
from waiting import wait_until

from distribution import Engine, RouteDescriptor
from distribution.catalog import CatalogStore, roll_call
from distribution.metrics import serve_metrics
from distribution.watcher import CatalogWatcher

WAIT = 30.0


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample served on ``port``: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_a_scrape_shows_the_watcher_as_it_stands(store: CatalogStore, database_url: str) -> None:
    store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)])
    with CatalogStore.from_url(database_url) as own:
        watcher = CatalogWatcher(own, Engine(), name="scraped")
        with watcher:
            wait_until(lambda: watcher.listening and watcher.applied_version == 1)
            server = serve_metrics(watcher, 0, "127.0.0.1")
            try:
                port = server.server_port
                written = store.split_route(1, b"m", 1).version
                assert watcher.wait_for(written, WAIT)
                wait_until(lambda: watcher.notifications >= 1)
                samples = scrape(port)
                w = {"watcher": "scraped"}
                assert value(samples, "distribution_watcher_applied_version", **w) == written
                assert value(samples, "distribution_watcher_catalog_version", **w) == written
                assert value(samples, "distribution_watcher_lag_versions", **w) == 0
                assert value(samples, "distribution_watcher_lag_seconds", **w) == 0
                assert value(samples, "distribution_watcher_listening", **w) == 1
                assert value(samples, "distribution_watcher_routes", **w) == 2
                assert value(samples, "distribution_watcher_notifications_total", **w) >= 1
                assert value(samples, "distribution_watcher_syncs_total", **w) >= 1
                assert value(samples, "distribution_watcher_resets_total", **w) == 0
                assert value(samples, "distribution_watcher_repairs_total", **w) == 0
                verified = value(samples, "distribution_watcher_verified_version", **w)
                assert verified == watcher.verified_version <= written
                applied_at = value(
                    samples, "distribution_watcher_last_apply_timestamp_seconds", **w
                )
                assert 0 < time.time() - applied_at < WAIT
                assert not [key for key in samples if key[0] == "distribution_watcher_errors_total"]

                # A lost listener is an error, counted by type, read at the next scrape.
                backend = roll_call(store).watchers[0].backend_pid
                with psycopg.connect(database_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", [backend])
                wait_until(lambda: watcher.errors["CatalogUnavailableError"] >= 1)
                samples = scrape(port)
                errors = value(
                    samples,
                    "distribution_watcher_errors_total",
                    type="CatalogUnavailableError",
                    **w,
                )
                assert errors >= 1
            finally:
                server.shutdown()
                server.server_close()


def test_watch_serves_its_metrics(store: CatalogStore, database_url: str) -> None:
    store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)])
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "distribution",
            "--database-url",
            database_url,
            "watch",
            "--name",
            "cli",
            "--metrics-port",
            str(port),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: [w.name for w in roll_call(store).watchers] == ["cli"], timeout=60)
        written = store.split_route(1, b"m", 1).version
        wait_until(lambda: roll_call(store).watchers[0].applied_version == written)
        samples = scrape(port)
        assert value(samples, "distribution_watcher_applied_version", watcher="cli") == written
        assert value(samples, "distribution_watcher_routes", watcher="cli") == 2
    finally:
        process.kill()
        process.wait(30)
