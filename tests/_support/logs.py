"""Waiting for a log record: the event some tests have to wait on when the code under test logs it
and signals nothing else (a connection closed, a sweep done)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator


class LogWatch(logging.Handler):
    """Sets an event when a record of `logger` satisfies `match` (on its formatted message)."""

    def __init__(self, logger: str, match: Callable[[str], bool]) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logger
        self.match = match
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name == self.logger and self.match(record.getMessage()):
            self.seen.set()

    def wait(self, timeout: float = 5.0) -> bool:
        return self.seen.wait(timeout)


@contextlib.contextmanager
def watch_log(logger: str, match: Callable[[str], bool], level: int = logging.INFO) -> Iterator[LogWatch]:
    """A `LogWatch` on `logger`'s records of `level` and above, for the duration of the block.

    It hangs on the root logger, after pytest's capturing handlers: by the time the event is set, the
    record is in `caplog` too.
    """
    watch = LogWatch(logger, match)
    target = logging.getLogger(logger)
    previous = target.level
    if target.getEffectiveLevel() > level:
        target.setLevel(level)  # no lower: a logger at DEBUG can slow the code under test down
    root = logging.getLogger()
    root.addHandler(watch)
    try:
        yield watch
    finally:
        root.removeHandler(watch)
        target.setLevel(previous)
