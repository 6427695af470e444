"""The CLI's default database: an embedded PostgreSQL server kept in a data folder.

No ``DISTRIBUTION_DATABASE_URL`` here: the commands start the embedded server on demand in a
temporary ``DISTRIBUTION_DATA_DIR``, keep it running between commands, and keep its data across a
``db stop``. The server is always stopped at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from distribution.cli import embedded_database_url
from distribution.cli.embedded import EmbeddedDatabase

pytestmark = pytest.mark.slow


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DISTRIBUTION_DATABASE_URL"}
    env["DISTRIBUTION_DATA_DIR"] = str(data_dir)
    env["PYTHONIOENCODING"] = "utf-8"
    return subprocess.run(
        [sys.executable, "-m", "distribution", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=180,
        check=False,
    )


def _ok(data_dir: Path, *args: str) -> str:
    result = _cli(data_dir, *args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert result.stderr == "", result.stderr
    return result.stdout


def test_embedded_server_starts_on_demand_and_keeps_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    embedded = EmbeddedDatabase(data_dir)
    try:
        status = _ok(data_dir, "db", "status")
        assert "not running" in status and "not created yet" in status
        assert not data_dir.exists()  # status starts nothing

        started = _ok(data_dir, "db", "start")
        assert started.startswith("started the embedded PostgreSQL server\n"), started
        assert "catalog version 1: 2 routes" in _ok(data_dir, "init", "--groups", "2")
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        routes = _ok(data_dir, "routes")  # a second process, on the same server
        assert "catalog version 1: 2 routes" in routes and '"\\x80"' in routes

        status = _ok(data_dir, "db", "status")
        assert "embedded PostgreSQL server: running (pid " in status
        assert f"folder: {data_dir / 'pgdata'}" in status
        assert "url: postgresql://postgres:@/postgres?host=" in status
        assert "catalog version: 1" in status

        assert "stopped" in _ok(data_dir, "db", "stop")
        assert not embedded.status().running
        assert "not running" in _ok(data_dir, "db", "status")
        assert "not running" in _ok(data_dir, "db", "stop")

        # The next command starts the server again, and the data is still there.
        split = _ok(data_dir, "split", "1", "0x40")
        assert "catalog version 2" in split
        assert embedded.status().running
        assert "catalog version 2: 3 routes" in _ok(data_dir, "routes")
        again = _ok(data_dir, "db", "start")
        assert again.startswith("the embedded PostgreSQL server was already running\n"), again
        url = _ok(data_dir, "db", "url").strip()
        assert url == embedded_database_url(data_dir) == embedded.status().url

        # No terminal to ask on: a reset needs --yes, and nothing is deleted without it.
        refused = _cli(data_dir, "db", "reset")
        assert refused.returncode == 2 and "--yes" in refused.stderr
        assert "catalog version 2" in _ok(data_dir, "routes")
        assert "is gone" in _ok(data_dir, "db", "reset", "--yes")
        assert not embedded.status().running and not embedded.pgdata.exists()
    finally:
        embedded.stop()
    assert not embedded.status().running

