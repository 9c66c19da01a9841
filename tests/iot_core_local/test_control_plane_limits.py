"""The control plane's bounds: a request must arrive in time, and only so many connections are served."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from iot_core_local.ca import CertificateAuthority
from iot_core_local.control_plane import ControlPlane
from iot_core_local.control_plane.http import ControlPlaneLimits, DeadlineSocketReader
from iot_core_local.registry import Registry
from tests._support.clients import iot_client


@pytest.fixture
def plane(
    cp_registry: Registry, cp_ca: CertificateAuthority, request: pytest.FixtureRequest
) -> Iterator[ControlPlane]:
    limits = ControlPlaneLimits(**getattr(request, "param", {}))
    with ControlPlane(cp_registry, cp_ca, limits=limits) as running:
        yield running


def _connect(plane: ControlPlane) -> socket.socket:
    return socket.create_connection(("127.0.0.1", plane.port), timeout=5)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (the socket's 5 s timeout fails the test)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.parametrize("plane", [{"request_timeout": 0.5}], indirect=True)
@pytest.mark.parametrize(
    "half",
    [
        b"GET /things HTTP/1.1\r\nHost: local",  # half a head
        b"POST /policies/p HTTP/1.1\r\nHost: local\r\nContent-Length: 100\r\n\r\n{",  # half a body
    ],
    ids=["head", "body"],
)
def test_half_sent_request_is_closed_after_the_timeout(plane: ControlPlane, half: bytes) -> None:
    # Before: each half-sent request held a server thread for good.
    sock = _connect(plane)
    try:
        sock.sendall(half)
        assert _read_until_closed(sock) == b""  # closed, no answer
    finally:
        sock.close()
    assert plane.timed_out_requests.total == 1
    assert iot_client(plane.url).list_things()["things"] == []  # everyone else is served


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_trickled_request_gets_one_deadline_for_all_its_reads() -> None:
    # A byte now and then resets a socket timeout, never this deadline.
    server, client = socket.socketpair()
    clock = _Clock()
    reader = DeadlineSocketReader(server, clock)
    reader.deadline = 10.0
    buffer = bytearray(16)
    try:
        for _ in range(3):
            client.sendall(b"G")
            clock.now += 3.0
            assert reader.readinto(buffer) == 1
        clock.now += 1.0
        client.sendall(b"E")
        with pytest.raises(TimeoutError):
            reader.readinto(buffer)
        assert reader.received == 3
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("plane", [{"max_connections": 4}], indirect=True)
def test_connections_beyond_the_cap_get_503_logged_once(
    plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: every connection got a thread, without limit.
    held = [_connect(plane) for _ in range(4)]  # each holds a thread, waiting for its request
    refused = [_connect(plane) for _ in range(20)]
    try:
        for sock in refused:
            answer = _read_until_closed(sock)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert plane.refused_connections.total == 20
        lines = [r for r in caplog.records if "max_connections" in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].levelno == logging.WARNING
    finally:
        for sock in held + refused:
            sock.close()
    # The held connections' threads end when their clients go; botocore retries a 503 meanwhile.
    client: Any = iot_client(plane.url)
    assert client.list_things()["things"] == []


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="request_timeout"):
        ControlPlaneLimits(request_timeout=0)


def test_local_iot_core_hands_its_limits_to_the_broker_and_the_control_plane(tmp_path: Any) -> None:
    from iot_core_local.broker import BrokerLimits
    from iot_core_local.server import LocalIotCore

    core = LocalIotCore(
        tmp_path / "data",
        broker_limits=BrokerLimits(max_queued_messages=7, max_queued_bytes=4096),
        control_plane_limits=ControlPlaneLimits(request_timeout=0.5),
        key_pool_size=0,
    )
    with core:
        conf = (tmp_path / "data" / "mosquitto" / "mosquitto.conf").read_text().splitlines()
        assert "max_queued_messages 7" in conf
        assert "max_queued_bytes 4096" in conf
        # A half-sent request is dropped after the configured 0.5 s, not the default 10 s.
        api = core.endpoint.api_url.removeprefix("http://").rstrip("/")
        host, port = api.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /things HTTP/1.1\r\nHost: x\r\n")
            assert sock.recv(1024) == b""  # closed by the server within the socket's 5 s


@pytest.mark.parametrize(
    ("what", "status"),
    [("a 100,000-character paging token", 414), ("a 70 KiB header", 431)],
)
def test_http_level_refusals_are_aws_json_errors(tmp_path: Path, what: str, status: int) -> None:
    """What http.server refuses itself (request line or header too long) still has AWS's error shape."""
    import http.client

    from iot_core_local.server import LocalIotCore

    with LocalIotCore(tmp_path / "data", key_pool_size=0) as core:
        port = int(core.endpoint.api_url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            if status == 414:
                connection.request("GET", "/things?nextToken=" + "A" * 100_000)
            else:
                connection.request("GET", "/things", headers={"X-Big": "b" * 70_000})
            response = connection.getresponse()
            assert response.status == status
            assert response.getheader("Content-Type") == "application/json"
            assert response.getheader("x-amzn-ErrorType") == "InvalidRequestException"
            assert json.loads(response.read())["message"]
        finally:
            connection.close()
