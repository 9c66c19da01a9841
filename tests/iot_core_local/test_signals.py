"""TerminationSignals: what `serve` and the set-up commands wait on until SIGINT or SIGTERM.

Its handler takes no lock (a handler calling Event.set() could wait forever for the lock the interrupted
main thread held inside that Event's wait(): a `serve` ignored SIGTERM for 11 minutes in QA). These tests
run it in a child process, as the commands do, and signal it from outside.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import signal, sys
    from iot_core_local.signals import TerminationSignals

    before = signal.getsignal(signal.SIGTERM)
    for round in range(int(sys.argv[1])):
        with TerminationSignals() as signals:
            print("waiting", flush=True)
            print("got", signals.wait(), flush=True)
    print("restored", signal.getsignal(signal.SIGTERM) is before, flush=True)
    """
)


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_the_wait_ends_on_the_signal_and_the_handlers_are_restored(number: int) -> None:
    rounds = 20
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(rounds)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    try:
        for _ in range(rounds):
            assert child.stdout.readline() == "waiting\n"
            child.send_signal(number)
            assert child.stdout.readline() == f"got {int(number)}\n"
        assert child.stdout.readline() == "restored True\n"
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def test_a_signal_before_the_wait_is_not_lost() -> None:
    """serve installs them before it starts: a SIGTERM during the start ends the wait at once after it."""
    code = textwrap.dedent(
        """
        import os, signal
        from iot_core_local.signals import TerminationSignals

        with TerminationSignals() as signals:
            os.kill(os.getpid(), signal.SIGTERM)
            print(signals.wait())
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, f"{int(signal.SIGTERM)}\n"), done.stderr
