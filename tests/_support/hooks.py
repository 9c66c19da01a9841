"""A pre-provisioning hook target for templates: a local HTTP server that answers and records."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
    """A pre-provisioning hook target: answers every POST with `answer`, records what it got."""

    def __init__(self, answer: dict[str, Any] | None, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.requests.append(json.loads(self.rfile.read(length)))
                if hook.delay:
                    # A slow hook is the behaviour under test (the gateway gives a hook 5 s): this server
                    # really takes that long to answer; no test waits on it.
                    threading.Event().wait(hook.delay)
                body = json.dumps(hook.answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = _HookHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
