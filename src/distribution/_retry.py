"""Retrying something unreachable: jittered, capped backoff, and the outage it makes.

Pure helpers of :mod:`distribution.watcher`, kept apart from its sync logic: a fleet of watchers
that lost their server must not come back all at once (hence the full jitter), and an outage is
worth one log line when it starts and one when it ends, whatever the attempts in between.
"""

from __future__ import annotations

import random
import time

__all__ = ["Backoff", "Outage"]


class Backoff:
    """Waits between attempts: drawn at random between ``base`` and ``base * 2**attempt``
    seconds, capped at ``cap`` (never below ``base``).

    >>> backoff = Backoff(0.1, cap=10.0)
    >>> backoff.next(), backoff.attempts
    (0.1, 1)
    >>> 0.1 <= backoff.next() <= 0.2
    True
    >>> all(0.1 <= backoff.next() <= 10.0 for _ in range(100))
    True
    """

    def __init__(self, base: float, *, cap: float) -> None:
        self._base = base
        self._cap = cap
        self._attempt = 0

    def next(self) -> float:
        """The wait before the next attempt, in seconds; O(1)."""
        # The exponent is bounded: 2.0**1024 overflows, and the cap is reached long before.
        ceiling = min(self._cap, self._base * 2.0 ** min(self._attempt, 64))
        self._attempt += 1
        return random.uniform(self._base, max(self._base, ceiling))

    @property
    def attempts(self) -> int:
        """The waits drawn since the last :meth:`reset`. O(1)."""
        return self._attempt

    def reset(self) -> None:
        """Start again from ``base`` (an attempt succeeded). O(1)."""
        self._attempt = 0


class Outage:
    """A run of failed attempts to reach something: when it began and how many failed.

    >>> outage = Outage()
    >>> outage.running, outage.failed(), outage.failed(), outage.running
    (False, True, False, True)
    >>> duration, attempts = outage.end()
    >>> attempts, outage.end(), outage.running
    (2, None, False)
    """

    def __init__(self) -> None:
        # When the running outage began (``time.monotonic()``); None: none is running.
        self._began: float | None = None
        self._attempts = 0

    def failed(self) -> bool:
        """Count a failed attempt: True when it begins an outage (say so once). O(1)."""
        first = self._began is None
        if first:
            self._began = time.monotonic()
            self._attempts = 0
        self._attempts += 1
        return first

    @property
    def running(self) -> bool:
        """Whether an outage is running: failed, and not ended since. O(1)."""
        return self._began is not None

    def end(self) -> tuple[float, int] | None:
        """End the running outage: its duration in seconds and its failed attempts; None when
        none was running. O(1)."""
        if self._began is None:
            return None
        ended = (time.monotonic() - self._began, self._attempts)
        self._began = None
        return ended
