"""``python -m distribution.cli``: the ``distribution`` command."""

from __future__ import annotations

import sys

from distribution.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
