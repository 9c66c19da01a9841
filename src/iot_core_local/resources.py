"""Bounded resources: the process's descriptor limit, and telling about a limit once per interval.

A server under a flood hits the same limit thousands of times a second; one log line per event is itself
the denial of service (a full disk of tracebacks). `LimitLog` counts the events and writes one line per
interval with the count, the first event at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["LimitLog", "raise_open_file_limit"]

log = logging.getLogger("iot_core_local.server")


class LimitLog:
    """One log line per `interval` for a limit that is hit, naming how often it was hit since the last.

    Thread-safe (the control plane's threads share one). `clock` is monotonic seconds; tests pass one
    they advance. `level`: of the interval line (WARNING for a limit; INFO for what a hostile or broken
    client causes, such as a failed TLS handshake). Every event not written at `level` is written at
    DEBUG with its detail, so that turning DEBUG on still shows each one.
    """

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        interval: float = 10.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        level: int = logging.WARNING,
    ) -> None:
        self.logger = logger
        self.what = what  # e.g. "connection refused: 4000 connections open (max_connections)"
        self.interval = interval
        self.clock = clock
        self.level = level
        self.total = 0  # every event since start, for tests and diagnostics
        self._pending = 0
        self._next: float | None = None
        self._lock = threading.Lock()

    def hit(self, detail: str = "") -> None:
        """Count one event; log if the interval since the last line has passed."""
        with self._lock:
            self.total += 1
            self._pending += 1
            now = self.clock()
            quiet = self._next is not None and now < self._next
            if not quiet:
                count, self._pending = self._pending, 0
                self._next = now + self.interval
        if quiet:
            if detail:
                self.logger.debug("%s: %s", self.what, detail)
            return
        suffix = f" (last: {detail})" if detail else ""
        self.logger.log(
            self.level, "%s: %d time(s) in the last %g s%s", self.what, count, self.interval, suffix
        )


def raise_open_file_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit; the limit now in force.

    Every device connection costs two descriptors (the device's socket and the relay to the broker),
    and the usual soft limit of 1,024 is reached by ~500 connections, far below what the hard limit
    allows without privileges.
    """
    try:
        import resource
    except ImportError:  # not a Unix: nothing to raise
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:  # e.g. macOS caps it below an "unlimited" hard limit
            log.warning("could not raise the open file limit from %d to %d: %s", soft, hard, e)
    log.info("open file limit: %d", soft)
    return int(soft)
