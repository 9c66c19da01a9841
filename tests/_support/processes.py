"""`hub-onboard` as a real child process, frozen or killed from outside at exact points (power cuts).

The child runs `python -m hub_onboarding.cli COMMAND --config X [-vv] [--json]`. With `--json`, provision
writes each step as one JSON line on stderr (`{"step": "CERTIFICATE_ISSUED", "message": ...}`);
`HubProcess.steps` and `wait_for_step` read those, never the wording of log lines.

A test-only `sitecustomize` (CHILD_SHIM, put on the child's PYTHONPATH by `write_shim`; never part of the
product) stops the child with SIGSTOP at one exact point when HUBTEST_FREEZE is set, so the harness can
SIGKILL it there:
  {"kind": "step", "step": S, "nth": n}      after the n-th step event S on stderr (needs --json, which
                                             HubProcess adds for this kind)
  {"kind": "replace", "path": ..., "nth": n}  right after the n-th os.replace onto `path` (a config write)
  {"kind": "fsync", "prefix": ..., "nth": n}  right after the n-th fsync of a temp file named prefix*.tmp,
                                             i.e. in the middle of an atomic write (before its rename)
HUBTEST_OPENLOG=path records every file the child opens (Python's audit hook), one per line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHILD_SHIM = r"""
import json, os, signal, sys

def _freeze():
    try:
        sys.stderr.flush()
    except Exception:
        pass
    os.kill(os.getpid(), signal.SIGSTOP)

_spec_text = os.environ.get("HUBTEST_FREEZE")
if _spec_text:
    _spec = json.loads(_spec_text)
    _count = [0]

    def _hit():
        _count[0] += 1
        if _count[0] == _spec.get("nth", 1):
            _freeze()

    if _spec["kind"] == "step":
        def _step_of(text):
            if not text.startswith("{"):
                return None
            try:
                event = json.loads(text)
            except ValueError:
                return None
            return event.get("step") if isinstance(event, dict) else None

        class _Tee:
            def __init__(self, stream):
                self._stream = stream
            def write(self, text):
                n = self._stream.write(text)
                if _step_of(text) == _spec["step"]:
                    self._stream.flush()
                    _hit()
                return n
            def __getattr__(self, name):
                return getattr(self._stream, name)
        sys.stderr = _Tee(sys.stderr)
    elif _spec["kind"] == "replace":
        _real_replace = os.replace
        def _replace(src, dst, *args, **kwargs):
            _real_replace(src, dst, *args, **kwargs)
            if os.path.abspath(dst) == _spec["path"]:
                _hit()
        os.replace = _replace
    elif _spec["kind"] == "fsync":
        _real_fsync = os.fsync
        def _fsync(fd):
            _real_fsync(fd)
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                return
            if name.startswith(_spec["prefix"]) and name.endswith(".tmp"):
                _hit()
        os.fsync = _fsync

_openlog = os.environ.get("HUBTEST_OPENLOG")
if _openlog:
    _fd = os.open(_openlog, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    def _audit(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            os.write(_fd, os.fsencode(os.fspath(args[0])) + b"\n")
    sys.addaudithook(_audit)
"""


def write_shim(folder: Path) -> Path:
    """Put CHILD_SHIM in `folder` as sitecustomize.py; return the folder (for HubProcess(shim_dir=))."""
    (folder / "sitecustomize.py").write_text(CHILD_SHIM)
    return folder


def freeze_at_step(step: str, nth: int = 1) -> dict[str, Any]:
    """The freeze spec that stops the child right after it reported `step` (an OnboardingStep name)."""
    return {"kind": "step", "step": step, "nth": nth}


def _step_of(line: str) -> str | None:
    """The step name of one of provision's --json step lines on stderr; None for any other line."""
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except ValueError:
        return None
    step = event.get("step") if isinstance(event, dict) else None
    return step if isinstance(step, str) else None


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    steps: list[str] = field(default_factory=list)  # the step events, in order (runs with --json)


class HubProcess:
    """`hub-onboard provision --config X -vv` as a real child process (python -m hub_onboarding.cli)."""

    def __init__(
        self,
        config: Path,
        *args: str,
        shim_dir: Path | None = None,
        freeze: dict[str, Any] | None = None,
        openlog: Path | None = None,
        umask: int | None = None,
        command: str = "provision",
        verbosity: str = "-vv",
        json_steps: bool = False,
    ) -> None:
        env = dict(os.environ)
        if shim_dir is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim_dir), env.get("PYTHONPATH")]))
        if freeze is not None:
            env["HUBTEST_FREEZE"] = json.dumps(freeze)
            json_steps = json_steps or freeze["kind"] == "step"
        if openlog is not None:
            env["HUBTEST_OPENLOG"] = str(openlog)
        argv = [sys.executable, "-m", "hub_onboarding.cli", command, "--config", str(config)]
        if verbosity:
            argv.append(verbosity)
        if json_steps and "--json" not in args:
            argv.append("--json")
        argv.extend(args)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._stdout: list[str] = []
        self._readers = [
            threading.Thread(target=self._read_stderr, daemon=True),
            threading.Thread(target=self._read_stdout, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:  # end of output: wake anyone waiting for a line that will not come
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self._stdout.append(self.proc.stdout.read())

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """The first stderr line containing `text` (as soon as the child writes it)."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: any(text in line for line in self.lines) or self.proc.poll() is not None, timeout
            )
            for line in self.lines:
                if text in line:
                    return line
        raise AssertionError(f"no line with {text!r} within {timeout} s (finished={found}): {self.stderr}")

    def wait_for_step(self, step: str, timeout: float = 30.0) -> None:
        """Wait until the child reports `step` (an OnboardingStep name) on its --json step lines."""
        with self._changed:
            self._changed.wait_for(lambda: step in self._steps() or self.proc.poll() is not None, timeout)
            if step in self._steps():
                return
        raise AssertionError(f"no step {step} within {timeout} s: {self.stderr}")

    def _steps(self) -> list[str]:
        return [s for s in map(_step_of, self.lines) if s is not None]

    @property
    def steps(self) -> list[str]:
        with self._changed:
            return self._steps()

    def wait_frozen(self, timeout: float = 30.0) -> None:
        """Wait until the child stopped itself (SIGSTOP from the shim).

        waitid reports the stop as it happens; WNOWAIT leaves the child to Popen (a child that exited
        instead is still reaped by Popen, with its real status). It blocks, so it runs on a thread.
        """
        outcome: list[os.waitid_result | None] = []
        reported = threading.Event()

        def watch() -> None:
            try:
                outcome.append(os.waitid(os.P_PID, self.proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT))
            except ChildProcessError:  # already reaped by Popen: it has ended
                outcome.append(None)
            reported.set()

        threading.Thread(target=watch, daemon=True).start()
        if not reported.wait(timeout):
            raise AssertionError(
                f"the child did not reach the freeze point within {timeout} s: {self.stderr}"
            )
        result = outcome[0]
        if result is None or result.si_code != os.CLD_STOPPED:
            raise AssertionError(f"the child ended before the freeze point: {self.stderr}")

    def kill(self) -> Finished:
        """SIGKILL from outside (a power cut), then collect what it printed."""
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.finish(10)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def finish(self, timeout: float = 60.0) -> Finished:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"hub-onboard did not finish within {timeout} s: {self.stderr}") from None
        for reader in self._readers:
            reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        elapsed = time.monotonic() - self.started
        return Finished(self.proc.returncode, self.stdout, self.stderr, elapsed, self.steps)

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self.lines)

    @property
    def stdout(self) -> str:
        return "".join(self._stdout)


def run_hub(config: Path, *args: str, timeout: float = 60.0, **options: Any) -> Finished:
    """Run `hub-onboard` to completion in a child process."""
    return HubProcess(config, *args, **options).finish(timeout)
