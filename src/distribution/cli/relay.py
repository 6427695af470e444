"""``distribution relay``: publish every catalog write's notification on NATS.

The relay LISTENs on the catalog's primary (the session's database) and publishes each
notification on a NATS subject, for watchers following NATS instead of LISTEN (see
:mod:`distribution.fanout`). It runs until SIGTERM or SIGINT (Ctrl-C), exits 0 then, and logs its
state changes on stderr, one line each; it never gives up on the database or on NATS.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

from distribution.cli.errors import EXIT_OK, CommandError

if TYPE_CHECKING:
    from distribution.cli.session import Session

__all__ = ["add_relay_arguments", "cmd_relay"]

# The defaults, repeated here so that ``--help`` does not import the database layers.
_DEFAULT_SUBJECT = "distribution.catalog"
_DEFAULT_HEARTBEAT = 30.0


def add_relay_arguments(relay: argparse.ArgumentParser) -> None:
    """The ``relay`` command's own options."""
    relay.add_argument(
        "--nats",
        metavar="URL",
        action="append",
        required=True,
        help="a NATS server, nats://HOST:PORT (repeat for a cluster's other servers)",
    )
    relay.add_argument(
        "--subject",
        metavar="S",
        default=_DEFAULT_SUBJECT,
        help=f"the subject to publish on (default: {_DEFAULT_SUBJECT})",
    )
    relay.add_argument(
        "--heartbeat",
        metavar="SECONDS",
        type=float,
        default=_DEFAULT_HEARTBEAT,
        help="republish the newest version this often, so that a watcher that missed a message "
        f"finds out (default: {_DEFAULT_HEARTBEAT:g})",
    )


class _InfoLines(logging.Handler):
    """The relay's info lines on stderr (warnings already go there, through the CLI's handler)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.addFilter(lambda record: record.levelno < logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        print(f"distribution: {' '.join(record.getMessage().split())}", file=sys.stderr, flush=True)


@contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """Set ``stop`` on SIGTERM and SIGINT while the block runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cmd_relay(session: Session) -> int:
    """Relay catalog notifications from the primary to NATS until SIGTERM or SIGINT."""
    import importlib.util

    import sqlalchemy as sa

    from distribution.catalog import CatalogStore
    from distribution.fanout import CatalogRelay, NatsNotifications, check_subject

    if importlib.util.find_spec("nats") is None:
        raise CommandError("the relay needs the nats extra: pip install 'distribution[nats]'")
    args = session.args
    check_subject(args.subject)
    if not 0 < args.heartbeat <= threading.TIMEOUT_MAX:
        raise CommandError(
            f"--heartbeat must be positive seconds, at most {threading.TIMEOUT_MAX:g}, "
            f"got {args.heartbeat:g}",
            2,
        )
    logger = logging.getLogger("distribution.fanout")
    handler = _InfoLines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    stop = threading.Event()
    try:
        # No pool: the relay reads the version over its one listening connection.
        with (
            _stopped_by_signals(stop),
            CatalogStore.from_url(
                session.url(),
                poolclass=sa.pool.NullPool,
                connect_args={"application_name": "distribution-relay"},
            ) as store,
            NatsNotifications(args.nats, args.subject, name="distribution-relay") as fanout,
        ):
            session.note(
                f"relaying catalog writes to NATS subject {args.subject} (SIGTERM or Ctrl-C stops)"
            )
            CatalogRelay(store, fanout, heartbeat=args.heartbeat).run(stop)
    finally:
        logger.removeHandler(handler)
    return EXIT_OK
