"""The Mosquitto process behind the gateway.

Mosquitto is the pub/sub engine (sessions, retained messages, wills, QoS 1 redelivery); the gateway in
front of it does everything AWS-specific. It is the gateway's alone: it listens on no TCP port at all,
only on a Unix socket in its 0700 folder of the data dir, so the only processes that can reach it are
those that can already read the data dir (the server's user). Before, it listened on a loopback port
with anonymous access: any local process could read every device's traffic, inject commands and forge
`$aws/events/...` (a forged JITR event re-activated an INACTIVE certificate).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import itertools
import logging
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .datadir import open_nofollow, read_nofollow, write_atomically
from .errors import ServerError

__all__ = ["Broker", "BrokerLimits", "open_connection", "socket_address", "wait_accepting"]

log = logging.getLogger("iot_core_local.broker")

_START_DEADLINE = 10.0
_STOP_DEADLINE = 5.0
# Bound relative to Mosquitto's working directory (its folder), so that the data dir's path length never
# matters to Mosquitto; connected to by the absolute path, or through /proc when that path is too long.
SOCKET_NAME = "mosquitto.sock"
# sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, including the terminating NUL.
_SUN_PATH_MAX = 107 if sys.platform == "linux" else 103
# Mosquitto listens on its Unix socket with a backlog of 10; beyond it, a non-blocking connect fails at
# once with EAGAIN (TCP would have retried its SYN). Retried after these pauses, doubling, until the
# caller's own deadline.
_BACKLOG_RETRY_FIRST = 0.001
_BACKLOG_RETRY_MAX = 0.05
# A relay's reader pauses reading from Mosquitto past twice this many unread bytes. asyncio's default
# (64 KiB, so 128 KiB) is what a subscriber that does not read costs the server while the relay waits
# for it; with 200 of them, 16 KiB saved ~17 MB. The relay reads whole MQTT packets of any size anyway.
_READER_LIMIT = 16 * 1024
_LOG_TAIL_LINES = 20
# Where Debian/Ubuntu install it; daemons live in sbin, which is often not on a user's PATH.
_FALLBACK_PATHS = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


def _find_mosquitto() -> str:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _FALLBACK_PATHS:
        if os.access(candidate, os.X_OK):
            return candidate
    raise ServerError(
        "Mosquitto 2.0 is required but was not found on PATH or in /usr/sbin: "
        "install it (Debian/Ubuntu: 'sudo apt-get install -y mosquitto')"
    )


def _parent_death_signal() -> Callable[[], None] | None:
    """A `preexec_fn` that makes the kernel send SIGTERM to the child when its parent dies (Linux).

    Without it, `kill -9` of the server left Mosquitto running; after a restart, the orphan's autosave
    overwrote the new broker's persistence file. SIGTERM rather than SIGKILL: Mosquitto then saves its
    persistence file before it exits, so retained messages survive a crash of the server. A restart
    that comes before that save is over waits for it (`stop_stale`).
    """
    if sys.platform != "linux":
        return None
    # Loaded in the parent: between fork and exec the child only calls into it, it loads nothing.
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def set_death_signal() -> None:
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        # The parent may have died between fork and prctl; the signal would then never come.
        if os.getppid() != parent:
            os._exit(1)

    return set_death_signal


def _is_our_broker(pid: int, config_path: Path) -> bool:
    """True if the process `pid` runs Mosquitto with `config_path`: a stale pid file must never make us
    signal someone else's process. The caller holds a pidfd of `pid`, so the pid cannot be reused by
    another process between this check and the signal."""
    try:
        # Bytes: a command line need not be UTF-8.
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return False
    wanted = os.fsencode(config_path)
    return any(a == b"-c" and b == wanted for a, b in itertools.pairwise(cmdline))


def _wait_exit(pidfd: int, timeout: float) -> bool:
    # A pidfd becomes readable when its process exits: an event to wait on, not a poll.
    readable, _, _ = select.select([pidfd], [], [], timeout)
    return bool(readable)


def socket_address(directory: Path) -> tuple[str, int | None]:
    """(the path a client of this process connects to, a descriptor it needs kept open, or None).

    The socket's absolute path when it fits `sun_path`. When it does not (a deep data dir, pytest's
    `tmp_path`), the path through `/proc/self/fd/N` of an `O_PATH` descriptor of the folder, which
    always fits, is Linux's own and names the same socket; elsewhere, a ServerError naming the fix.
    """
    path = directory / SOCKET_NAME
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return str(path), None
    if sys.platform != "linux":
        raise ServerError(
            f"the data dir's path is too long for Mosquitto's Unix socket ({len(os.fsencode(path))} bytes "
            f"> {_SUN_PATH_MAX}): choose a shorter --data-dir"
        )
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW)
    return f"/proc/self/fd/{fd}/{SOCKET_NAME}", fd


async def open_connection(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One stream to Mosquitto's Unix socket at `address`; waits while its accept backlog is full.

    A burst of device connections (1,000 at once) fills Mosquitto's backlog of 10 faster than it
    accepts; a connect then fails with EAGAIN. asyncio's own connect takes EAGAIN for "in progress" and
    hands back a socket that is not connected (its first read fails with EINVAL: the device got CONNACK
    136), so the connect is made here, and tried again shortly. The caller bounds the whole wait
    (`GatewayLimits.broker_timeout`).
    """
    pause = _BACKLOG_RETRY_FIRST
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(address)  # a Unix socket connects at once, or not at all
        except BlockingIOError:
            sock.close()
            # Mosquitto tells nobody when its backlog has room: trying again is the only way to know.
            await asyncio.sleep(pause)
            pause = min(pause * 2, _BACKLOG_RETRY_MAX)
            continue
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_unix_connection(sock=sock, limit=_READER_LIMIT)


def wait_accepting(address: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Whether the Mosquitto `process` accepts connections on its Unix socket `address` within `timeout`
    (False at once if it exits). Polled with a deadline: Mosquitto is another process and tells nobody when
    its socket is open, so trying to connect is the only way to know."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            probe.connect(address)
            return True
        time.sleep(0.02)
    return False


@dataclass(frozen=True)
class BrokerLimits:
    """What Mosquitto may hold per client (mosquitto.conf(5)); each is one line of its config.

    Without them, a subscriber that does not read made Mosquitto hold ~100 MB. The gateway closes such
    a subscriber after `GatewayLimits.client_drain_timeout`; these bound what piles up until then, and
    what a persistent session keeps while its device is away.
    """

    # QoS 1 messages sent and not yet acknowledged, per client (Mosquitto's default is 20).
    max_inflight_messages: int = 20
    # QoS 1 messages queued beyond those in flight, per client; later ones are dropped.
    max_queued_messages: int = 1000
    # The same queue in bytes (Mosquitto's default is no limit). It also bounds the QoS 0 messages Mosquitto
    # holds for a connected client that does not read: with 1 MiB, 60 such subscribers cost Mosquitto
    # ~85 MB (bench/abuse.py); with 256 KiB, 200 of them 12-36 MB, which put server + broker over the
    # 250 MB goal in about a third of the runs (229-260 MB); with 128 KiB 10-16 MB (214-234 MB). 128 KiB
    # still takes one message of AWS's largest size (128 KiB) and hundreds of typical device messages.
    max_queued_bytes: int = 128 * 1024

    def __post_init__(self) -> None:
        for name in ("max_inflight_messages", "max_queued_messages", "max_queued_bytes"):
            value = getattr(self, name)
            # 0 means "no maximum" to Mosquitto: not a bound, so not accepted here.
            if not value > 0:
                raise ValueError(f"BrokerLimits.{name} must be positive, not {value!r}")

    def config_lines(self) -> list[str]:
        return [
            f"max_inflight_messages {self.max_inflight_messages}",
            f"max_queued_messages {self.max_queued_messages}",
            f"max_queued_bytes {self.max_queued_bytes}",
        ]


class Broker:
    """A Mosquitto child process with its config, persistence, log and socket in `directory`.

    `address` is the Unix socket path this process connects to, valid while the broker runs.
    """

    def __init__(self, directory: Path, limits: BrokerLimits | None = None) -> None:
        # Absolute: the config path on Mosquitto's command line is how a later server recognises it.
        self.directory = Path(directory).absolute()
        self.limits = limits if limits is not None else BrokerLimits()
        self.address = ""
        self._address_fd: int | None = None  # keeps `/proc/self/fd/N/...` valid while we run
        self.config_path = self.directory / "mosquitto.conf"
        self.log_path = self.directory / "mosquitto.log"
        self.stderr_path = self.directory / "mosquitto.stderr"
        # The running broker's pid, so that a server started after a crash can stop an orphan of ours.
        self.pid_path = self.directory / "mosquitto.pid"
        self._process: subprocess.Popen[bytes] | None = None
        # The thread that forks Mosquitto. The kernel's parent-death signal fires when the forking
        # *thread* exits, not the process; this thread lives until `stop()`, whatever thread calls
        # `start()` (a test's worker thread, say, that ends while the server runs).
        self._spawner: ThreadPoolExecutor | None = None

    def _config(self) -> str:
        # Mosquitto started as root drops to the user "mosquitto", which then cannot write into our
        # 0700 directory; naming the current user keeps it as is (and is a no-op for non-root).
        user = pwd.getpwuid(os.getuid()).pw_name
        return "\n".join(
            [
                "# Generated by iot-core-local at every start; edits are overwritten.",
                # A Unix socket and no TCP listener: the gateway's alone (see the module's docstring).
                # Relative to Mosquitto's working directory, this folder: see SOCKET_NAME.
                f"listener 0 {SOCKET_NAME}",
                # Only the server's user can reach the socket; the gateway authenticates devices itself.
                "allow_anonymous true",
                # AWS IoT Core has no QoS 2; the gateway refuses it before it gets here, this is a backstop.
                "max_qos 1",
                # Per-client queues bounded in messages and bytes.
                *self.limits.config_lines(),
                f"user {user}",
                "persistence true",
                f"persistence_location {self.directory}/",
                "persistence_file mosquitto.db",
                "autosave_interval 60",
                f"log_dest file {self.log_path}",
                "log_type error",
                "log_type warning",
                "log_type notice",
                "log_timestamp true",
                "connection_messages false",
                "",
            ]
        )

    def start(self) -> None:
        """Start Mosquitto on its Unix socket and wait until it accepts connections."""
        if self._process is not None:
            return
        executable = _find_mosquitto()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.directory.stat().st_mode & 0o077:
            self.directory.chmod(0o700)
        self.stop_stale()
        self.address, self._address_fd = socket_address(self.directory)
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="iot-core-local-broker")
        try:
            process = self._launch(executable)
        except BaseException:
            self._stop_spawner()
            self._close_address()
            raise
        self._process = process
        log.info("mosquitto (pid %d) listening on %s", process.pid, self.directory / SOCKET_NAME)

    def _launch(self, executable: str) -> subprocess.Popen[bytes]:
        assert self._spawner is not None
        # The server checks the data dir for links at start, but one planted after that check must not
        # redirect this write (or the chmod after a plain write) to another file: atomic and no-follow.
        write_atomically(self.config_path, self._config().encode(), 0o600)
        process = self._spawner.submit(self._spawn, executable).result()
        write_atomically(self.pid_path, f"{process.pid}\n".encode(), 0o600)
        error = self._wait_ready(process)
        if error is not None:
            self._terminate(process)
            raise ServerError(f"Mosquitto did not start: {error}")
        return process

    def _spawn(self, executable: str) -> subprocess.Popen[bytes]:
        # stderr goes to a file, not a pipe: nobody reads a pipe while the broker runs, and a full
        # pipe would block it.
        # Opened without following a link planted since the start-time check (ServerError instead).
        fd = open_nofollow(self.stderr_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "ab") as stderr:
            return subprocess.Popen(
                [executable, "-c", str(self.config_path)],
                cwd=self.directory,  # where its relative socket path is bound
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the server, which stops us
                preexec_fn=_parent_death_signal(),  # noqa: PLW1509 - only prctl and getppid run there
            )

    def stop_stale(self) -> None:
        """Stop a Mosquitto that a crashed server of this data dir left running, before ours starts.

        Two brokers on one persistence file overwrite each other's saves. The pid file names the
        candidate; it is signalled only if it is alive and runs Mosquitto with this directory's config,
        so a stale pid reused by an unrelated process is left alone. SIGTERM (it saves and exits), then
        SIGKILL after a deadline.
        """
        try:
            pid = int(read_nofollow(self.pid_path).decode("ascii", "replace").strip())
        except (FileNotFoundError, ValueError):
            return
        if sys.platform != "linux" or pid <= 0:
            return
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return
            raise
        try:
            if not _is_our_broker(pid, self.config_path):
                log.info("pid file names process %d, which is not our Mosquitto; left alone", pid)
                return
            log.warning("stopping Mosquitto (pid %d) left running by a previous server", pid)
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not _wait_exit(pidfd, _STOP_DEADLINE):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                if not _wait_exit(pidfd, _STOP_DEADLINE):
                    raise ServerError(
                        f"Mosquitto (pid {pid}) of {self.directory} did not stop; stop it, then start again"
                    )
        except ProcessLookupError:  # it exited between our checks
            return
        finally:
            os.close(pidfd)
        with contextlib.suppress(FileNotFoundError):
            self.pid_path.unlink()

    def _stop_spawner(self) -> None:
        spawner, self._spawner = self._spawner, None
        if spawner is not None:
            spawner.shutdown(wait=True)

    def _wait_ready(self, process: subprocess.Popen[bytes]) -> str | None:
        if wait_accepting(self.address, process, _START_DEADLINE):
            return None
        if process.poll() is not None:
            return f"it exited with status {process.returncode}\n{self._log_tail()}"
        return f"its socket did not accept connections within {_START_DEADLINE:.0f} s\n{self._log_tail()}"

    def _close_address(self) -> None:
        self.address = ""
        fd, self._address_fd = self._address_fd, None
        if fd is not None:
            os.close(fd)

    def _log_tail(self) -> str:
        lines: list[str] = []
        for path in (self.stderr_path, self.log_path):
            with contextlib.suppress(OSError, ServerError):  # a link is not followed, not even to read
                text = read_nofollow(path).decode("utf-8", errors="replace")
                lines += text.splitlines()[-_LOG_TAIL_LINES:]
        return "\n".join(lines)

    @staticmethod
    def _terminate(process: subprocess.Popen[bytes]) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(_STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(_STOP_DEADLINE)

    def stop(self) -> None:
        """SIGTERM (Mosquitto then saves its persistence file), SIGKILL after a deadline; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            self._terminate(process)
            with contextlib.suppress(FileNotFoundError):
                self.pid_path.unlink()
            log.info("mosquitto stopped")
        # After the broker has exited: this thread's end would send it the parent-death signal.
        self._stop_spawner()
        self._close_address()
