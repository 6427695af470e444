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
    from distribution.fanout import NatsNotifications

__all__ = ["add_nats_arguments", "add_relay_arguments", "cmd_relay", "open_nats"]

# The defaults, repeated here so that ``--help`` does not import the database layers.
_DEFAULT_SUBJECT = "distribution.catalog"
_DEFAULT_HEARTBEAT = 30.0


def add_nats_arguments(parser: argparse.ArgumentParser, *, required: bool, verb: str) -> None:
    """``--nats`` and ``--subject``, as ``relay`` (``verb``: publish) and ``watch`` (follow)
    take them."""
    parser.add_argument(
        "--nats",
        metavar="URL",
        action="append",
        required=required,
        help="a NATS server, nats://HOST:PORT (repeat for a cluster's other servers)",
    )
    parser.add_argument(
        "--subject",
        metavar="S",
        default=_DEFAULT_SUBJECT,
        help=f"the subject to {verb} (default: {_DEFAULT_SUBJECT})",
    )


def open_nats(session: Session, name: str) -> NatsNotifications:
    """The NATS connection ``--nats`` and ``--subject`` name; a CommandError without the extra."""
    import importlib.util

    from distribution.fanout import NatsNotifications, check_subject

    if importlib.util.find_spec("nats") is None:
        raise CommandError("--nats needs the nats extra: pip install 'distribution[nats]'")
    check_subject(session.args.subject)
    return NatsNotifications(session.args.nats, session.args.subject, name=name)


def add_relay_arguments(relay: argparse.ArgumentParser) -> None:
    """The ``relay`` command's own options."""
    add_nats_arguments(relay, required=True, verb="publish on")
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
    import sqlalchemy as sa

    from distribution.catalog import CatalogStore
    from distribution.fanout import CatalogRelay

    args = session.args
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
        # No pool: the relay reads the version, and changes too large for a notification, over
        # its one listening connection.
        with (
            _stopped_by_signals(stop),
            CatalogStore.from_url(
                session.url(),
                poolclass=sa.pool.NullPool,
                connect_args={"application_name": "distribution-relay"},
            ) as store,
            open_nats(session, "distribution-relay") as fanout,
        ):
            session.note(
                f"relaying catalog writes to NATS subject {args.subject} (SIGTERM or Ctrl-C stops)"
            )
            CatalogRelay(store, fanout, heartbeat=args.heartbeat).run(stop)
    finally:
        logger.removeHandler(handler)
    return EXIT_OK
