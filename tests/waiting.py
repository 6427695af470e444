"""Waiting, in tests, for what another thread or process does."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["WAIT", "wait_until"]

#: How long a test waits by default for what should happen promptly (generous: CI is slow).
WAIT = 30.0


def wait_until(
    condition: Callable[[], bool], what: str = "the condition", timeout: float = WAIT
) -> None:
    """Return once ``condition()`` is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
