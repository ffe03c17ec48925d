import os
import sys

import pytest

from rankwarden.testing import leftover_processes

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "scripts")

#: Every job a test starts has an id with this prefix, so leftovers are findable.
JOB_PREFIX = "t-"


@pytest.fixture(autouse=True)
def no_leftover_processes():
    """A test that starts processes must leave none behind (ranks, their children, zombies)."""
    yield
    left = leftover_processes("RANKWARDEN_JOB_ID", JOB_PREFIX)
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
