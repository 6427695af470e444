"""``python -m distribution``: the ``distribution`` command (see :mod:`distribution.cli`)."""

from __future__ import annotations

import sys

from distribution.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
