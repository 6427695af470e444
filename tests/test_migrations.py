"""Tests of the catalog schema's Alembic migrations and of ``distribution.migrate``.

* pytest-alembic's built-in tests, on a fresh database with no schema;
* ``migrate`` is idempotent and safe from several processes at once;
* ``alembic upgrade head`` / ``alembic downgrade base`` from the repository root honour
  ``DISTRIBUTION_DATABASE_URL``;
* ``migrate`` works from an installed, non-editable wheel (the migrations ship in the package);
* the server functions and triggers of ``migrations/sql/``: each revision installs the same
  definitions forever, an upgraded catalog holds exactly what a fresh one does, a downgrade
  restores exactly what was there.
"""

from __future__ import annotations

import difflib
import doctest
import hashlib
import importlib.metadata
import json
import os
import random
import shutil
import subprocess
import sys
import sysconfig
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
from alembic.script import ScriptDirectory
from distribution.migrations import replaceable
from pytest_alembic.config import Config
from pytest_alembic.tests import (  # noqa: F401  (collected by pytest)
    test_model_definitions_match_ddl,
    test_single_head_revision,
    test_up_down_consistency,
    test_upgrade,
)

import distribution
import distribution.migrator
from distribution import RouteDescriptor, RouteState
from distribution.catalog import CatalogStore
from distribution.database import create_engine
from distribution.migrator import VERSION_TABLE
from distribution.migrator import alembic_config as packaged_alembic_config
from distribution.models import u64_to_db

REPOSITORY = Path(__file__).resolve().parents[1]
TABLES = {"distribution_meta", "distribution_routes", "distribution_history"}
HEAD = "0004"


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
    assert len(objects["triggers"]) == 15
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


def _alembic(url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the alembic command from the repository root on ``url`` (None: no URL at all)."""
    env = {k: v for k, v in os.environ.items() if k != "DISTRIBUTION_DATABASE_URL"}
    if url is not None:
        env["DISTRIBUTION_DATABASE_URL"] = url
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
    result = _alembic(None, "upgrade", "head")
    assert result.returncode != 0
    assert "DISTRIBUTION_DATABASE_URL" in result.stderr
    assert schema_objects(empty_database_url)["tables"] == set()


# --------------------------------------------------------------------------------------------
# Server functions and triggers: migrations/sql/ applied by revision (migrations/replaceable.py)
# --------------------------------------------------------------------------------------------

#: A digest of the definitions each revision installs. Databases out there hold them: a released
#: revision never changes what it installs. Changing a server object is a new revision (README,
#: "Layout"), whose digest is added here.
REVISION_DIGESTS = {
    "0001": "62305d32d786695ba786c7c60d2839f8741eda4f0a24e35a2e506624faadb6d5",
    "0002": "0c4e1b0aeabddb20194faa342466e8c6c2d9863ed921455e90551a77319dd6e4",
    "0003": "9c13a23c7aad44de5b19353c418facbcad5d249b2e6717982d99193c9d7304cc",
    "0004": "9f29c3b53d39c6d0a87cf6e2bbe08fca7df3005fb29dc4391de9d3168e23c80c",
}


def revision_modules() -> dict[str, Any]:
    """Every revision's migration module, oldest first."""
    script = ScriptDirectory(str(REPOSITORY / "migrations"))
    return {s.revision: s.module for s in reversed(list(script.walk_revisions()))}


def installed_by(module: Any) -> tuple[str, ...]:
    """The server objects a revision creates or replaces."""
    return tuple(getattr(module, "OBJECTS", ())) + tuple(getattr(module, "REPLACED", ()))


def definitions(url: str) -> dict[str, str]:
    """Every catalog function's and trigger's definition, as PostgreSQL prints it."""
    with psycopg.connect(url, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT p.proname, pg_get_functiondef(p.oid) FROM pg_proc p"
            " JOIN pg_namespace n ON n.oid = p.pronamespace"
            " WHERE n.nspname = 'public' AND p.proname LIKE 'distribution%%'"
            " UNION ALL SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger"
            " WHERE NOT tgisinternal AND tgname LIKE 'distribution%%'"
        ).fetchall()
    return dict(rows)


def test_each_revision_installs_what_it_always_did() -> None:
    digests = {
        revision: hashlib.sha256(
            "".join(replaceable.definition(name, revision) for name in installed_by(module)).encode()
        ).hexdigest()
        for revision, module in revision_modules().items()
    }
    assert digests == REVISION_DIGESTS, (
        "a revision's server functions changed: change them in a new revision instead"
    )


def test_every_definition_file_is_installed_by_a_revision() -> None:
    files = {path.stem for path in replaceable.SQL_FOLDER.glob("*/*.sql")}
    created: list[str] = []
    replaced: set[tuple[str, str]] = set()
    for revision, module in revision_modules().items():
        created += getattr(module, "OBJECTS", ())
        replaced |= {(name, revision) for name in getattr(module, "REPLACED", ())}
    assert sorted(created) == sorted(files)
    diffs = {
        tuple(path.name.removesuffix(".diff").rsplit(".", 1))
        for path in replaceable.SQL_FOLDER.glob("*/*.diff")
    }
    assert diffs == replaced
    for path in replaceable.SQL_FOLDER.glob("*/*.sql"):
        assert path.read_text().endswith(";\n"), path


def test_a_fresh_catalog_holds_the_head_definitions(database_url: str) -> None:
    held = definitions(database_url)
    assert set(held) == {path.stem for path in replaceable.SQL_FOLDER.glob("*/*.sql")}
    with psycopg.connect(database_url, autocommit=True) as connection:
        for name in held:
            connection.execute(replaceable.definition(name, HEAD))
    assert definitions(database_url) == held


def test_a_replaced_definition_differs_from_the_one_before() -> None:
    revisions = list(revision_modules())
    for revision, module in revision_modules().items():
        previous = revisions[revisions.index(revision) - 1]
        for name in getattr(module, "REPLACED", ()):
            before = replaceable.definition(name, previous)
            after = replaceable.definition(name, revision)
            assert before != after, name
            assert f" {name}(" in before
    payload = "distribution_change_payload"
    assert "max_payload_bytes" in replaceable.definition(payload, "0003")
    assert "max_payload_bytes" not in replaceable.definition(payload, "0002")


def test_replaceable_doctests() -> None:
    assert doctest.testmod(replaceable).failed == 0


@pytest.mark.parametrize("seed", range(40))
def test_reverting_a_diff_gives_back_the_text_before_it(seed: int) -> None:
    rng = random.Random(seed)
    words = ["BEGIN", "END", "    x := 1;", "", "    RETURN y;", "-- why", "--- a", "+ b", "@@"]
    old = [rng.choice(words) + "\n" for _ in range(rng.randrange(0, 30))]
    new = list(old)
    for _ in range(rng.randrange(1, 6)):
        at = rng.randrange(0, len(new) + 1)
        if new and rng.random() < 0.5:
            del new[at : at + rng.randrange(1, 4)]
        else:
            new[at:at] = [rng.choice(words) + "\n" for _ in range(rng.randrange(1, 4))]
    diff = "".join(difflib.unified_diff(old, new, "a", "b", n=rng.randrange(0, 4)))
    assert replaceable._revert("".join(new), diff, Path("x.diff")) == "".join(old)
    if any(added for _, _, added in replaceable._hunks(diff)):
        # Text the diff's new side is not in.
        with pytest.raises(ValueError, match=r"x\.diff does not apply"):
            replaceable._revert("changed\n" * (len(new) + 5), diff, Path("x.diff"))


def test_an_upgrade_from_0002_keeps_the_data_and_matches_a_fresh_catalog(
    empty_database_url: str, database_url: str
) -> None:
    """A catalog with routes and history at revision 0002 upgrades to what a fresh catalog holds,
    keeps every row (the columns added since are NULL in them), notifies as the new definitions
    do, and downgrades to exactly 0002 again."""
    upgrade = _alembic(empty_database_url, "upgrade", "0002")
    assert upgrade.returncode == 0, upgrade.stderr
    with CatalogStore.from_url(empty_database_url) as store:
        store.save(
            0,
            [
                RouteDescriptor(route_id=1, start=b"", end=b"m", group_id=1),
                RouteDescriptor(route_id=2, start=b"m", end=None, group_id=2),
            ],
        )
        store.split_route(1, b"g", expected_version=1)
        store.set_route_state(2, RouteState.WRITE_FENCED, expected_version=2)
    rows = "SELECT * FROM {} ORDER BY 1, 2"
    with psycopg.connect(empty_database_url, autocommit=True) as connection:
        before = {
            table: connection.execute(rows.format(table)).fetchall()
            for table in ("distribution_meta", "distribution_routes", "distribution_history")
        }
    at_0002 = definitions(empty_database_url)

    upgrade = _alembic(empty_database_url, "upgrade", "head")
    assert upgrade.returncode == 0, upgrade.stderr
    assert definitions(empty_database_url) == definitions(database_url)
    with psycopg.connect(empty_database_url, autocommit=True) as connection:
        after = {table: connection.execute(rows.format(table)).fetchall() for table in before}
        width = {table: len(rows_before[0]) for table, rows_before in before.items()}
        assert {t: [row[: width[t]] for row in after[t]] for t in after} == before
        assert {value for t in after for row in after[t] for value in row[width[t] :]} <= {None}
        connection.execute("LISTEN distribution_catalog")
        with CatalogStore.from_url(empty_database_url) as store:
            saved = store.save(3, [*store.snapshot().routes[:2]])
            # Writes made before the upgrade recorded no digest; the first one after it does.
            assert [c.digest for c in store.changes_since(0).changes] == [None] * 3 + [
                saved.digest
            ]
        (notify,) = connection.notifies(timeout=10, stop_after=1)
    version, _, change = notify.payload.partition(" ")
    assert int(version) == saved.version == 4
    assert json.loads(change) == {
        "previous": 3,
        "upserts": [],
        "deletes": [2],
        "digest": saved.digest,
    }

    downgrade = _alembic(empty_database_url, "downgrade", "0002")
    assert downgrade.returncode == 0, downgrade.stderr
    assert definitions(empty_database_url) == at_0002


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
    # The dependencies come from this environment, which may be a virtualenv of its own (not the
    # system's): its folders go on the new one's path (their .pth files, such as an editable
    # install of this project, are not run).
    here = sysconfig.get_paths()
    there = sysconfig.get_paths(vars={"base": str(environment), "platbase": str(environment)})
    Path(there["purelib"], "dependencies.pth").write_text(
        "\n".join(dict.fromkeys([here["purelib"], here["platlib"]])) + "\n"
    )
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
