"""A rank stops itself when its heartbeats go unanswered (a partition: TCP goes silent, it does not close).

Real rank processes (the bootstrap and a test script) against a fake
coordinator on loopback that welcomes them and then answers, or does not.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import trio

from rankwarden import protocol
from rankwarden.worker._client import EXIT_COORDINATOR_LOST

from tests.conftest import SCRIPTS

pytestmark = pytest.mark.liveness

TIMEOUT = 1.5
INTERVAL = 0.1


async def fake_coordinator(task_status=trio.TASK_STATUS_IGNORED, *, answer: bool, acks: bool = True,
                           answer_every: float = 0.0):
    """``answer_every``: at most one answer per that many seconds, as the real
    coordinator does (a quarter of heartbeat_timeout)."""
    async def handle(stream):
        decoder = protocol.FrameDecoder(protocol.ToCoordinator)
        answered_at = -1e9
        async with stream:
            welcomed = False
            while data := await stream.receive_some(65536):
                for message in decoder.feed(data):
                    if isinstance(message, protocol.Hello) and not welcomed:
                        welcomed = True
                        await stream.send_all(protocol.encode(protocol.Welcome(
                            version=protocol.PROTOCOL_VERSION, heartbeat_interval=INTERVAL, attempt=1, acks=acks)))
                    elif isinstance(message, protocol.Heartbeat) and answer and (
                            trio.current_time() - answered_at >= answer_every):
                        answered_at = trio.current_time()
                        await stream.send_all(protocol.encode(protocol.HeartbeatAck(seq=message.seq)))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    task_status.started(port)
    await trio.serve_listeners(handle, listeners)


def rank_env(port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(RANK="0", RANKWARDEN_COORDINATOR=f"127.0.0.1:{port}", RANKWARDEN_TOKEN="t", RANKWARDEN_JOB_ID="t-acks",
               RANKWARDEN_ATTEMPT="1", RANKWARDEN_HEARTBEAT_TIMEOUT=repr(TIMEOUT), RANKWARDEN_COORDINATOR_PID="")
    return env


async def run_rank(port: int, *argv: str, limit: float) -> tuple[int, str, float]:
    start = trio.current_time()
    # Forked from this (the loop's) thread: the bootstrap's PR_SET_PDEATHSIG follows
    # the parent thread, and trio.run_process forks in a worker thread that retires.
    process = subprocess.Popen([sys.executable, "-m", "rankwarden.worker._bootstrap", "script", *argv],
                               env=rank_env(port), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(limit):
            _, stderr = await trio.to_thread.run_sync(process.communicate, abandon_on_cancel=True)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, stderr.decode(), trio.current_time() - start


async def test_a_rank_whose_heartbeats_go_unanswered_stops_itself_within_the_timeout():
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: fake_coordinator(task_status, answer=False))
        code, stderr, took = await run_rank(port, os.path.join(SCRIPTS, "worker.py"), "--steps", "100000",
                                            "--no-report", limit=60)
        nursery.cancel_scope.cancel()
    assert code == EXIT_COORDINATOR_LOST, stderr
    assert f"the coordinator has not answered a heartbeat for {TIMEOUT:g}s (heartbeat_timeout)" in stderr
    assert took < 30  # started (imports), then TIMEOUT: bounded, not minutes of TCP retries


@pytest.mark.parametrize("answer, acks", [(True, True), (False, False)], ids=["answered", "coordinator-without-acks"])
async def test_a_rank_that_is_answered_or_not_promised_answers_keeps_running(answer, acks):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: fake_coordinator(task_status, answer=answer, acks=acks))
        # 30 steps of 0.1 s: twice the timeout and more.
        code, stderr, _ = await run_rank(port, os.path.join(SCRIPTS, "worker.py"), "--steps", "30",
                                         "--step-time", "0.1", "--no-report", limit=60)
        nursery.cancel_scope.cancel()
    assert code == 0, stderr


@pytest.mark.timeout(90)  # seconds of CPU time held: on a loaded 2-core host, several times that in wall time
# Throttled: the coordinator answers at most four times per timeout; answering
# more sparsely still (0.6 of the timeout) leaves a heartbeat unanswered when the
# hold starts nearly every time, which is the case that matters.
@pytest.mark.parametrize("answer_every", [0.0, TIMEOUT * 0.6], ids=["every-heartbeat", "throttled"])
async def test_a_starved_heartbeat_thread_is_not_mistaken_for_a_lost_coordinator(answer_every):
    # The GIL is held for twice the timeout. Answered every time, no heartbeat
    # is left unanswered; answered as the coordinator does (at most four times
    # per timeout), the last one before the hold may be: the rank must not take
    # its own starvation for the coordinator's silence (it asks again).
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: fake_coordinator(task_status, answer=True,
                                                                       answer_every=answer_every))
        code, stderr, _ = await run_rank(port, os.path.join(SCRIPTS, "hold_gil.py"), str(2 * TIMEOUT), "1.0",
                                         limit=60)
        nursery.cancel_scope.cancel()
    assert code == 0, stderr
