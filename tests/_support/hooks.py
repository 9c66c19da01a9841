"""A pre-provisioning hook (the customer's HTTP endpoint RegisterThing calls) on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@contextlib.contextmanager
def hook_server(answer: Any, *, hold: bool = False) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A hook that records each input and answers `answer` (JSON); yields (url, inputs seen).

    With `hold`, it answers nothing until the block ends: a hook slower than any timeout, without a test
    waiting for time to pass (the caller's own timeout is what runs out).
    """
    seen: list[dict[str, Any]] = []
    release = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            seen.append(json.loads(body))
            if hold:
                release.wait()
            data = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            with contextlib.suppress(OSError):  # the caller hangs up on a hook that is too slow
                self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", seen
    finally:
        release.set()
        server.shutdown()
        server.server_close()
