"""Tests of the catalog schema's Alembic migrations and of ``distribution.migrate``.

* pytest-alembic's built-in tests, on a fresh database with no schema;
* ``migrate`` is idempotent and safe from several processes at once;
* ``alembic upgrade head`` / ``alembic downgrade base`` from the repository root honour
  ``DISTRIBUTION_DATABASE_URL``;
* ``migrate`` works from an installed, non-editable wheel (the migrations ship in the package).
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import alembic.config
import psycopg
import psycopg.errors
import pytest
import sqlalchemy as sa
from pytest_alembic.config import Config
from pytest_alembic.tests import (  # noqa: F401  (collected by pytest)
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

import distribution
import distribution.migrator
from distribution import RouteDescriptor
from distribution.catalog import CatalogStore
from distribution.database import create_engine
from distribution.migrator import VERSION_TABLE
from distribution.migrator import alembic_config as packaged_alembic_config
from distribution.models import u64_to_db

REPOSITORY = Path(__file__).resolve().parents[1]
TABLES = {"distribution_meta", "distribution_routes", "distribution_history"}
HEAD = "0002"


@pytest.fixture
def alembic_config() -> Config:
    """The repository's migrations, configured in code (no alembic.ini from the working folder)."""
    config = alembic.config.Config()
    config.set_main_option("script_location", str(REPOSITORY / "migrations"))
    config.set_main_option("path_separator", "os")
    return Config(alembic_config=config)


@pytest.fixture
def alembic_engine(empty_database_url: str) -> Iterator[sa.Engine]:
    engine = create_engine(empty_database_url)
    try:
        yield engine
    finally:
        engine.dispose()


def schema_objects(url: str) -> dict[str, Any]:
    """What the database holds of the catalog schema."""
    with psycopg.connect(url, autocommit=True) as connection:
        tables = {
            row[0]
            for row in connection.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
            )
        }
        functions = sorted(
            row[0]
            for row in connection.execute(
                "SELECT proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = 'public' AND proname LIKE 'distribution%%'"
            )
        )
        triggers = sorted(
            row[0]
            for row in connection.execute(
                "SELECT tgname FROM pg_trigger WHERE NOT tgisinternal AND tgname LIKE 'distribution%%'"
            )
        )
        revisions: list[Any] = []
        if VERSION_TABLE in tables:
            revisions = [r[0] for r in connection.execute(f"SELECT * FROM {VERSION_TABLE}")]
        meta_rows = (
            connection.execute("SELECT count(*) FROM distribution_meta").fetchone()
            if "distribution_meta" in tables
            else None
        )
    return {
        "tables": tables,
        "functions": functions,
        "triggers": triggers,
        "revisions": revisions,
        "meta_rows": None if meta_rows is None else meta_rows[0],
    }


def assert_migrated(url: str) -> dict[str, Any]:
    objects = schema_objects(url)
    assert objects["tables"] == TABLES | {VERSION_TABLE}
    assert objects["revisions"] == [HEAD]
    assert objects["meta_rows"] == 1
    assert "distribution_save_desired" in objects["functions"]
    assert len(objects["functions"]) == len(set(objects["functions"]))
    assert len(objects["triggers"]) == 8
    with CatalogStore.from_url(url) as store:
        assert store.snapshot().version == 0
        assert store.next_route_id() == 1
    return objects


# --------------------------------------------------------------------------------------------
# migrate()
# --------------------------------------------------------------------------------------------


def test_migrate_is_exported() -> None:
    assert distribution.migrate is distribution.migrator.migrate  # type: ignore[attr-defined]


def test_migrate_is_idempotent(empty_database_url: str) -> None:
    assert schema_objects(empty_database_url)["tables"] == set()
    distribution.migrator.migrate(empty_database_url)
    first = assert_migrated(empty_database_url)
    # A catalog with data survives a second migrate untouched.
    with CatalogStore.from_url(empty_database_url) as store:
        saved = store.save(0, [RouteDescriptor(route_id=1, start=b"", end=None, group_id=1)])
    distribution.migrator.migrate(empty_database_url)
    distribution.migrator.migrate(empty_database_url)
    assert schema_objects(empty_database_url) == first
    with CatalogStore.from_url(empty_database_url) as store:
        assert store.snapshot() == saved


def test_migrate_accepts_an_engine(empty_database_url: str) -> None:
    engine = create_engine(empty_database_url)
    try:
        distribution.migrator.migrate(engine)
        distribution.migrator.migrate(engine)
        with engine.connect() as connection:
            assert connection.scalar(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")) == HEAD
    finally:
        engine.dispose()
    assert_migrated(empty_database_url)


def test_migrate_on_an_autocommit_engine_holds_its_lock_until_it_commits(
    empty_database_url: str,
) -> None:
    """Each DDL statement runs while the migration lock is held, in the migration's one
    transaction, even when the caller's engine commits every statement on its own."""
    key = distribution.migrator.MIGRATION_LOCK_KEY
    lock_held = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        " AND classid = %s AND objid = %s AND objsubid = 1"
    )
    seen: list[int] = []
    engine = create_engine(empty_database_url, isolation_level="AUTOCOMMIT")

    def before_execute(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("CREATE TABLE"):
            with psycopg.connect(empty_database_url, autocommit=True) as observer:
                row = observer.execute(lock_held, [(key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF])
                count = row.fetchone()
            seen.append(count[0] if count else 0)

    sa.event.listen(engine, "before_cursor_execute", before_execute)
    try:
        distribution.migrator.migrate(engine)
    finally:
        engine.dispose()
    assert seen and set(seen) == {1}, seen
    assert_migrated(empty_database_url)


def test_packaged_alembic_config_points_at_the_migrations() -> None:
    location = Path(packaged_alembic_config().get_main_option("script_location") or "")
    assert (location / "env.py").is_file()
    assert (location / "versions").is_dir()


_MIGRATE_WHEN_TOLD = textwrap.dedent(
    """
    import sys
    from distribution.migrator import migrate

    print("ready", flush=True)
    sys.stdin.readline()
    migrate(sys.argv[1])
    print("done", flush=True)
    """
)


def test_migrate_from_several_processes_at_once(empty_database_url: str) -> None:
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_WHEN_TOLD, empty_database_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        # Every process has imported everything before any starts migrating.
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [process.communicate(timeout=120) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err
        assert out.strip() == "done"
    assert_migrated(empty_database_url)


# --------------------------------------------------------------------------------------------
# The alembic command line, from the repository root
# --------------------------------------------------------------------------------------------


def _alembic(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DISTRIBUTION_DATABASE_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_alembic_command_line_upgrade_and_downgrade(empty_database_url: str) -> None:
    upgrade = _alembic(empty_database_url, "upgrade", "head")
    assert upgrade.returncode == 0, upgrade.stderr
    assert_migrated(empty_database_url)
    current = _alembic(empty_database_url, "current")
    assert current.returncode == 0, current.stderr
    assert HEAD in current.stdout

    downgrade = _alembic(empty_database_url, "downgrade", "base")
    assert downgrade.returncode == 0, downgrade.stderr
    objects = schema_objects(empty_database_url)
    # Alembic keeps its (now empty) version table; nothing of the catalog remains.
    assert objects["tables"] == {VERSION_TABLE}
    assert objects["revisions"] == []
    assert objects["functions"] == []
    assert objects["triggers"] == []

    again = _alembic(empty_database_url, "upgrade", "head")
    assert again.returncode == 0, again.stderr
    assert_migrated(empty_database_url)


def test_the_digest_migration_hashes_the_routes_already_there(
    empty_database_url: str, database_url: str
) -> None:
    """0002 computes the digest of the routes already there: the same value the triggers
    give a catalog saved at head with the same routes (tests/test_catalog.py checks the
    triggers against an independent Python computation)."""
    routes = [
        RouteDescriptor(route_id=1, start=b"", end=b"g", group_id=1),
        RouteDescriptor(route_id=2, start=b"g", end=b"p", group_id=2),
        RouteDescriptor(route_id=9, start=b"p", end=None, group_id=1),
    ]
    upgrade = _alembic(empty_database_url, "upgrade", "0001")
    assert upgrade.returncode == 0, upgrade.stderr
    digest = "SELECT digest FROM distribution_meta"
    with psycopg.connect(empty_database_url, autocommit=True) as connection:
        for r in routes:
            connection.execute(
                'INSERT INTO distribution_routes (route_id, start, "end", group_id, state, '
                "parent_route_id, valid_from) VALUES (%s, %s, %s, %s, 0, %s, %s)",
                [
                    u64_to_db(r.route_id),
                    r.start,
                    r.end,
                    u64_to_db(r.group_id),
                    u64_to_db(0),
                    u64_to_db(1),
                ],
            )
        upgrade = _alembic(empty_database_url, "upgrade", "head")
        assert upgrade.returncode == 0, upgrade.stderr
        migrated = connection.execute(digest).fetchone()
    with CatalogStore.from_url(database_url) as store:
        store.save(0, routes)
    with psycopg.connect(database_url) as connection:
        saved = connection.execute(digest).fetchone()
    assert migrated == saved
    assert saved != (0,)

    downgrade = _alembic(empty_database_url, "downgrade", "0001")
    assert downgrade.returncode == 0, downgrade.stderr
    objects = schema_objects(empty_database_url)
    assert "distribution_save_changes" not in objects["functions"]
    assert len(objects["triggers"]) == 4
    with (
        psycopg.connect(empty_database_url) as connection,
        pytest.raises(psycopg.errors.UndefinedColumn),
    ):
        connection.execute(digest)


def test_alembic_command_line_needs_a_database_url(empty_database_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DISTRIBUTION_DATABASE_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPOSITORY,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "DISTRIBUTION_DATABASE_URL" in result.stderr
    assert schema_objects(empty_database_url)["tables"] == set()


# --------------------------------------------------------------------------------------------
# An installed, non-editable package
# --------------------------------------------------------------------------------------------

_INSTALLED_MIGRATE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import distribution
    import distribution.migrator

    prefix = Path(sys.prefix).resolve()
    module = Path(distribution.__file__).resolve()
    assert prefix in module.parents, f"{module} is not installed in {prefix}"
    assert "__editable__" not in str(module)
    migrations = Path(distribution.migrator.alembic_config().get_main_option("script_location"))
    assert prefix in migrations.resolve().parents, migrations
    migrate = getattr(distribution, "migrate", None) or distribution.migrator.migrate
    migrate(sys.argv[1])
    # The Engine's compiled searches are in the wheel too.
    import distribution._lookup
    assert prefix in Path(distribution._lookup.__file__).resolve().parents
    assert distribution.Engine.with_default_route().get_route(b"k").group_id == 1
    print("migrated", flush=True)
    """
)


@pytest.mark.slow
def test_migrate_from_an_installed_wheel(tmp_path: Path, empty_database_url: str) -> None:
    source = tmp_path / "source"
    shutil.copytree(
        REPOSITORY,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "__pycache__", "*.egg-info", "*.so", ".ci", "benchmarks"
        ),
    )
    wheels = tmp_path / "wheels"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels)]
    # Build in this environment when its setuptools can (PEP 639 license expressions need
    # setuptools 77); otherwise pip builds in an isolated environment, as `pip install` does.
    if int(importlib.metadata.version("setuptools").split(".")[0]) >= 77:
        build.append("--no-build-isolation")
    built = subprocess.run(
        [*build, str(source)], capture_output=True, text=True, timeout=300, check=False
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = wheels.glob("distribution-*.whl")
    environment = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(environment)
    python = environment / ("Scripts" if os.name == "nt" else "bin") / "python"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    run = subprocess.run(
        [str(python), "-c", _INSTALLED_MIGRATE, empty_database_url],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "migrated"
    assert_migrated(empty_database_url)
