import os
import select
import sys
import time

import pytest

from rankwarden.testing import leftover_processes

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")

#: Every job a test starts has an id with this prefix.
JOB_PREFIX = "t-"
#: Every process this test session starts inherits this marker; leftovers are
#: found by it, so two test sessions on one machine never see each other's.
SESSION_MARKER = "RANKWARDEN_TEST_SESSION"
os.environ[SESSION_MARKER] = f"{os.getpid()}-{time.time_ns()}"


def _still_alive_after(pids, seconds):
    """Wait (on pidfds, no polling) for already-signalled processes to finish dying."""
    deadline = time.monotonic() + seconds
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        finally:
            os.close(fd)


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """A test that starts processes must leave none behind (ranks, their children, zombies).

    A process already SIGKILLed may take a moment to vanish; one still there
    after 5 s was never killed, and fails the test."""
    yield
    marker = os.environ[SESSION_MARKER]
    left = leftover_processes(SESSION_MARKER, marker)
    if left:
        _still_alive_after(left, 5.0)
        # Look again: the dying are gone now; the living and our own unreaped zombies are not.
        left = leftover_processes(SESSION_MARKER, marker)
    if left:
        for pid in left:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        pytest.fail(f"processes left behind by this test: {left}")


@pytest.fixture
def script():
    def path(name: str) -> str:
        return os.path.join(SCRIPTS, name)

    return path


@pytest.fixture
def python() -> str:
    return sys.executable
