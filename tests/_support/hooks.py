"""A pre-provisioning hook (the customer's HTTP endpoint RegisterThing calls) on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


class _HookHTTPServer(ThreadingHTTPServer):
    # Join handler threads on close, so a slow hook's late answer never lands in a later test's output,
    # and stay quiet when the gateway has already given up on it (a hook past 5 s writes to a closed socket).
    daemon_threads = False
    block_on_close = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class HookServer:
    """Answers every POST with `answer` (JSON) and records each input in `requests`.

    `delay`: the hook really takes that long to answer (a slow hook is then the behaviour under test; no
    test waits on it). `hold`: it answers nothing until closed, a hook slower than any timeout without a
    test waiting for time to pass (the caller's own timeout is what runs out). `trickle`: it sends its
    status line and headers one byte every `trickle` seconds, never finishing them before it is closed
    (a socket timeout restarts with each byte, so only a deadline over the whole call cuts it off).
    `arrived` is set for each request as it comes in (a test waits on it, not on time).
    """

    def __init__(self, answer: Any, *, delay: float = 0.0, hold: bool = False, trickle: float = 0.0) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.arrived = threading.Semaphore(0)
        released = threading.Event()
        self._released = released
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.requests.append(json.loads(self.rfile.read(length)))
                hook.arrived.release()
                if trickle:
                    self._trickle(trickle)
                    return
                if hold:
                    released.wait()
                elif delay:
                    released.wait(delay)
                body = json.dumps(hook.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(OSError):  # the caller hangs up on a hook that is too slow
                    self.wfile.write(body)

            def _trickle(self, interval: float) -> None:
                # Headers that never end ("X-Slow: aaaa..."), a byte at a time, until the server closes.
                with contextlib.suppress(OSError):
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
                    self.wfile.flush()
                    while not released.wait(interval):
                        self.wfile.write(b"a")
                        self.wfile.flush()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _HookHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> HookServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


@contextlib.contextmanager
def hook_server(
    answer: Any, *, hold: bool = False, trickle: float = 0.0
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A HookServer for the block; yields (url, inputs seen)."""
    with HookServer(answer, hold=hold, trickle=trickle) as hook:
        yield hook.url, hook.requests
