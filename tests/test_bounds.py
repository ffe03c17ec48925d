"""The suite's own time bounds: a hung test fails, in seconds, whatever it is stuck in.

Each case runs in a child pytest (pytester) with this suite's conftest and
settings, so a bound that did not work would show as a child that passes or
runs long, not as a hung parent (the parent is bounded by its own timeout)."""

from __future__ import annotations

import os
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

CASES = '''
import time

import pytest
import trio


@pytest.mark.timeout(2)
async def test_real_time_hang():
    await trio.sleep_forever()


@pytest.mark.timeout(2)
async def test_real_time_hang_in_shielded_teardown():
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.sleep_forever()


@pytest.mark.timeout(2)
async def test_blocking_call_on_the_loop():
    time.sleep(60)


async def test_autojump_loop_that_never_ends(autojump_clock):
    while True:  # a restart budget that is never spent
        await trio.sleep(30)


async def test_autojump_loop_in_a_shielded_scope(autojump_clock):
    with trio.CancelScope(shield=True):
        while True:  # a force delete that never happens, retried forever
            await trio.sleep(30)


@pytest.mark.virtual_time_limit(20000)
async def test_marker_raises_the_bound(autojump_clock):
    await trio.sleep(10000)
    assert trio.current_time() == 10000


async def test_within_the_default_bound(autojump_clock):
    await trio.sleep(3000)


async def test_a_real_time_test_after_the_crashed_runs():
    await trio.sleep(0.01)
'''


def test_hung_tests_fail_within_seconds(pytester):
    with open(os.path.join(HERE, "conftest.py")) as f:
        pytester.makeconftest(f.read())
    pytester.makeini(
        "[pytest]\ntrio_mode = true\ntimeout = 120\ntimeout_method = signal\n"
        "markers =\n    liveness: x\n    virtual_time_limit(seconds): x\nfilterwarnings = error\n"
    )
    pytester.makepyfile(test_cases=CASES)
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", timeout=90)
    elapsed = time.monotonic() - started
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed") == 5 and outcomes.get("passed") == 3, result.stdout.str()
    assert "error" not in outcomes, result.stdout.str()
    out = result.stdout.str()
    for name in ("test_real_time_hang", "test_real_time_hang_in_shielded_teardown", "test_blocking_call_on_the_loop",
                 "test_autojump_loop_that_never_ends", "test_autojump_loop_in_a_shielded_scope"):
        assert f"FAILED test_cases.py::{name} - " in out, out
    assert "Timeout (>2s): the test was cancelled" in out
    assert "the test ran past 3600s of virtual time" in out
    assert "the test ignored cancellation at 3600s" in out
    assert elapsed < 45, f"five hung tests took {elapsed:.1f}s to fail"
