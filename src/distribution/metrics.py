"""Prometheus metrics of a :class:`~distribution.CatalogWatcher` (the optional ``metrics`` extra).

:class:`WatcherCollector` reads the watcher's state when Prometheus scrapes, and only then: the
watcher's own paths do no work for it. A service adds three lines::

    from prometheus_client import REGISTRY, start_http_server
    from distribution.metrics import WatcherCollector
    REGISTRY.register(WatcherCollector(watcher)); start_http_server(9108)

Every metric carries the label ``watcher``, the watcher's name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from distribution.watcher import CatalogWatcher

__all__ = ["WatcherCollector", "serve_metrics"]

_LABELS = ("watcher",)


class WatcherCollector(Collector):
    """The metrics of one watcher, read at scrape time; ``collect`` is O(error types).

    ``distribution_watcher_``: ``applied_version``, ``verified_version`` (checked against the
    catalog's digest), ``catalog_version`` (the newest seen),
    ``lag_versions``, ``lag_seconds`` (0 when up to date, else the time since the watcher last
    applied a write), ``last_apply_timestamp_seconds``, ``listening`` (1 or 0), ``routes`` (in
    the Engine), and the counters ``notifications_total``, ``syncs_total``, ``resets_total``,
    ``repairs_total`` and ``errors_total`` (label ``type``: the exception's class name).
    """

    def __init__(self, watcher: CatalogWatcher) -> None:
        self._watcher = watcher

    def collect(self) -> Iterator[Metric]:
        """Yield every metric, as the watcher stands now; O(error types)."""
        watcher = self._watcher
        label = [watcher.name]
        lag = watcher.lag
        applied_at = watcher.applied_at
        if lag == 0:
            lag_seconds = 0.0
        elif applied_at is None:
            lag_seconds = watcher.status().uptime or 0.0  # behind since it started
        else:
            lag_seconds = max(0.0, time.time() - applied_at)
        gauges: list[tuple[str, str, float]] = [
            ("applied_version", "The catalog version the Engine holds.", watcher.applied_version),
            (
                "verified_version",
                "The newest version checked against the catalog's digest.",
                watcher.verified_version,
            ),
            ("catalog_version", "The newest catalog version seen.", watcher.catalog_version),
            ("lag_versions", "Versions the Engine is behind the newest seen.", lag),
            ("lag_seconds", "0 when up to date, else seconds since the last apply.", lag_seconds),
            (
                "last_apply_timestamp_seconds",
                "When the watcher last applied a write (Unix time; 0: never).",
                applied_at or 0.0,
            ),
            ("listening", "1 while the watcher listens, else 0.", float(watcher.listening)),
            ("routes", "The routes the Engine holds.", watcher.engine.route_count),
        ]
        for name, documentation, value in gauges:
            gauge = GaugeMetricFamily(
                f"distribution_watcher_{name}", documentation, labels=_LABELS
            )
            gauge.add_metric(label, value)
            yield gauge
        counters: list[tuple[str, str, int]] = [
            ("notifications", "Catalog notifications received.", watcher.notifications),
            ("syncs", "Catalog reads.", watcher.syncs),
            ("resets", "Full snapshots applied in place of changes.", watcher.resets),
            ("repairs", "Resets of an Engine found holding other routes.", watcher.repairs),
        ]
        for name, documentation, count in counters:
            counter = CounterMetricFamily(
                f"distribution_watcher_{name}", documentation, labels=_LABELS
            )
            counter.add_metric(label, count)
            yield counter
        errors = CounterMetricFamily(
            "distribution_watcher_errors", "Failures, by exception type.", labels=(*_LABELS, "type")
        )
        for kind, count in sorted(watcher.errors.items()):
            errors.add_metric([*label, kind], count)
        yield errors


def serve_metrics(watcher: CatalogWatcher, port: int, address: str = "0.0.0.0") -> WSGIServer:
    """Serve ``watcher``'s metrics over HTTP on ``address`` (every interface by default) and
    ``port`` (0: any free one, ``server_port`` tells which) from a background thread, with a
    registry of their own; ``shutdown()`` and ``server_close()`` the server returned to stop.
    O(1); a scrape is :meth:`WatcherCollector.collect`."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(WatcherCollector(watcher))
    server, thread = start_http_server(port, address, registry)
    thread.name = "distribution-metrics"
    return server
