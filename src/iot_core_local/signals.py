"""SIGINT and SIGTERM for the commands that run until stopped (`serve`, `setup-jitr`): the main thread
waits for one of them, and wakes the moment one arrives.

The handler only appends to a list. It must take no lock: Python runs a handler in the main thread between
two bytecodes, so a handler calling `threading.Event.set()` while the main thread was inside that Event's
own `wait()` (holding its condition's lock) waited for itself forever, and `serve` then ignored every later
SIGTERM (found by QA: a `serve` still running 11 minutes after SIGTERM, its main thread blocked on a lock).
`signal.set_wakeup_fd` makes the C-level handler write a byte to a socket the main thread selects on, so
the wait ends at once rather than at the next poll.
"""

from __future__ import annotations

import select
import signal
import socket
from types import FrameType, TracebackType

__all__ = ["TerminationSignals"]

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A fallback poll, in case a signal's byte was consumed before its Python handler ran.
_POLL = 0.5


class TerminationSignals:
    """`with TerminationSignals() as signals: ...; signals.wait()`: installed in the main thread only."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous_fd = -1
        self._previous: dict[int, object] = {}

    def __enter__(self) -> TerminationSignals:
        for number in _SIGNALS:
            self._previous[number] = signal.signal(number, self._on_signal)
        self._previous_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for number, handler in self._previous.items():
            signal.signal(number, handler)  # type: ignore[arg-type]  # what signal.signal returned
        self._reader.close()
        self._writer.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)  # no lock, no I/O: see the module's docstring

    def wait(self) -> int:
        """Block until SIGINT or SIGTERM has arrived (at once if one already has); its number."""
        while not self.received:
            select.select([self._reader], [], [], _POLL)
            try:
                while self._reader.recv(64):
                    pass
            except BlockingIOError:
                pass
        return self.received[0]
