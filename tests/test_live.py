"""Live recovery with real processes (gloo, CPU): the failed rank is replaced, the survivors keep their
processes and state, only the interrupted step is trained again, and the result is bit-identical."""

from __future__ import annotations

import json
import os
import signal

import pytest
import trio

from rankwarden.coordinator import Coordinator
from rankwarden.events import (
    AttemptStarted,
    FailureCause,
    JobState,
    LiveFallback,
    LiveReconfiguring,
    LiveRecovered,
    RankStarted,
)
from rankwarden.spec import JobSpec

from .conftest import JOB_PREFIX, SCRIPTS

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch
SCRIPT = os.path.join(SCRIPTS, "live_train.py")
WORLD = 3
STEPS = 80
KILL_AT = 25
_reference: dict[str, dict] = {}


def live_spec(tmp_path, name: str, **overrides) -> JobSpec:
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    fields = dict(
        entrypoint=SCRIPT, args=["--steps", str(STEPS), "--out", str(out)], world_size=WORLD,
        job_id=f"{JOB_PREFIX}{name}", job_dir=str(tmp_path / "job"), checkpoint_url=str(tmp_path / "ckpt"),
        heartbeat_timeout=3.0, progress_timeout=8.0, max_restarts=3, backoff={"initial": 0.1},
        live=True, live_timeout=60.0,
    )
    fields.update(overrides)
    return JobSpec(**fields)


def read_log(out, rank: int) -> list[dict]:
    with open(out / f"log_r{rank}.jsonl") as f:
        return [json.loads(line) for line in f]


def load(path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_state(a: dict, b: dict, what: str) -> None:
    """Every parameter and every optimizer tensor equal, bit for bit."""
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), f"{what}: parameter {key} differs"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys(), f"{what}: optimizer state keys differ"
    for index in sa:
        for name, value in sa[index].items():
            other = sb[index][name]
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other), f"{what}: optimizer {index}.{name} differs"
            else:
                assert value == other, f"{what}: optimizer {index}.{name} differs"


async def run(spec: JobSpec, fault=None) -> tuple[Coordinator, object]:
    coordinator = Coordinator(spec)
    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            if fault is not None:
                nursery.start_soon(fault, coordinator)
            snapshot = await coordinator.wait()
    return coordinator, snapshot


async def reference(tmp_path_factory) -> dict:
    """Final state of a fault-free run (computed once per session)."""
    if "final" not in _reference:
        tmp = tmp_path_factory.mktemp("live-reference")
        _, snapshot = await run(live_spec(tmp, "live-ref"))
        assert snapshot.state == JobState.SUCCEEDED
        _reference["final"] = load(tmp / "out" / "final_r0.pt")
    return _reference["final"]


async def wait_for_step(coordinator: Coordinator, rank: int, step: int) -> int:
    """The pid of ``rank`` once it has reported ``step``."""
    while True:
        snapshot = coordinator.snapshot().ranks[rank]
        if snapshot.step is not None and snapshot.step >= step and snapshot.pid:
            return snapshot.pid
        await trio.sleep(0.02)


def check_live_recovery(coordinator, snapshot, out, victim: int, victim_pid: int, pids_before: dict) -> None:
    """One live recovery: same pids for survivors, one replacement, nothing redone but one step,
    every rank's state equal right after the recovery."""
    assert snapshot.state == JobState.SUCCEEDED, coordinator.failure_report()
    history = coordinator.history()
    assert [e for e in history if isinstance(e, AttemptStarted)][-1].attempt == 1, "no group restart"
    assert not [e for e in history if isinstance(e, LiveFallback)]
    [recovered] = [e for e in history if isinstance(e, LiveRecovered)]
    assert recovered.ranks == [victim] and recovered.source != victim
    logs = {rank: read_log(out, rank) for rank in range(WORLD)}
    for rank in range(WORLD):
        pids = {entry["pid"] for entry in logs[rank]}
        if rank == victim:
            assert victim_pid in pids and len(pids) == 2, "the victim was replaced by exactly one process"
        else:
            assert pids == {pids_before[rank]}, f"survivor {rank} kept its process"
    # Steps: every step once, except the interrupted one (trained again, at most once).
    for rank in range(WORLD):
        if rank == victim:
            continue
        steps = [entry["step"] for entry in logs[rank] if entry["event"] == "step"]
        assert sorted(set(steps)) == list(range(STEPS)), f"rank {rank} skipped a step"
        assert len(steps) == STEPS, f"rank {rank} completed a step twice: {len(steps) - STEPS} redone"
    replacement_steps = [e["step"] for e in logs[victim] if e["event"] == "step" and e["pid"] != victim_pid]
    assert replacement_steps == list(range(recovered.step + 1, STEPS))
    victim_steps = [e["step"] for e in logs[victim] if e["event"] == "step" and e["pid"] == victim_pid]
    # The group resumes right after the source's last applied step: within one step of the victim's last.
    assert abs(recovered.step - max(victim_steps)) <= 1
    states = [load(out / f"state_g1_r{rank}.pt") for rank in range(WORLD)]
    for rank in range(1, WORLD):
        assert_same_state(states[0], states[rank], f"after the recovery, rank {rank} vs rank 0")


def signal_at_step(victim: int, sig: int, seen: dict):
    """What runs beside the coordinator: note every rank's pid at its first
    step, then send ``sig`` to ``victim`` once it reaches KILL_AT."""
    async def during(coordinator):
        seen["pids"] = {rank: await wait_for_step(coordinator, rank, 0) for rank in range(WORLD)}
        seen["victim"] = await wait_for_step(coordinator, victim, KILL_AT)
        os.kill(seen["victim"], sig)
    return during


async def test_kill_9_of_one_rank_is_recovered_live_and_ends_bit_identical(tmp_path, tmp_path_factory):
    spec = live_spec(tmp_path, "live-kill")
    out = tmp_path / "out"
    victim, seen = 1, {}

    coordinator, snapshot = await run(spec, signal_at_step(victim, signal.SIGKILL, seen))
    check_live_recovery(coordinator, snapshot, out, victim, seen["victim"], seen["pids"])
    [failure] = snapshot.failures
    assert (failure.rank, failure.cause) == (victim, FailureCause.SIGNALED)
    expected = await reference(tmp_path_factory)
    for rank in range(WORLD):
        assert_same_state(expected, load(out / f"final_r{rank}.pt"), f"final state of rank {rank}")


async def test_sigstop_of_one_rank_is_recovered_live(tmp_path, tmp_path_factory):
    # A frozen rank holds its sockets open: the coordinator's verdict (heartbeat
    # timeout) SIGKILLs it, and only then do the survivors' collectives fail.
    spec = live_spec(tmp_path, "live-stop")
    out = tmp_path / "out"
    victim, seen = 2, {}

    coordinator, snapshot = await run(spec, signal_at_step(victim, signal.SIGSTOP, seen))
    check_live_recovery(coordinator, snapshot, out, victim, seen["victim"], seen["pids"])
    [failure] = snapshot.failures
    assert (failure.rank, failure.cause) == (victim, FailureCause.HEARTBEAT_TIMEOUT)
    expected = await reference(tmp_path_factory)
    assert_same_state(expected, load(out / "final_r0.pt"), "final state")


async def test_hung_rank_is_the_one_killed_and_recovered_live(tmp_path, tmp_path_factory):
    # Alive and heartbeating but stuck: the survivors' collectives time out
    # first (RANKWARDEN_LIVE_COLLECTIVE_TIMEOUT = progress_timeout / 2), they
    # report themselves ready, so the progress deadline kills the hung rank
    # and not a survivor that waits for it.
    spec = live_spec(tmp_path, "live-hang")
    out = tmp_path / "out"
    victim, seen = 0, {}

    coordinator, snapshot = await run(spec, signal_at_step(victim, signal.SIGUSR1, seen))
    check_live_recovery(coordinator, snapshot, out, victim, seen["victim"], seen["pids"])
    [failure] = snapshot.failures
    assert (failure.rank, failure.cause) == (victim, FailureCause.PROGRESS_TIMEOUT)
    expected = await reference(tmp_path_factory)
    assert_same_state(expected, load(out / "final_r1.pt"), "final state")


async def test_second_failure_during_reconfiguration_falls_back_to_a_group_restart(tmp_path, tmp_path_factory):
    spec = live_spec(tmp_path, "live-second")
    out = tmp_path / "out"
    victim, seen = 1, {}

    async def kill_twice(coordinator):
        seen["victim"] = await wait_for_step(coordinator, victim, KILL_AT)
        os.kill(seen["victim"], signal.SIGKILL)
        async for event in coordinator.events():
            if isinstance(event, RankStarted) and event.rank == victim and event.pid != seen["victim"]:
                os.kill(event.pid, signal.SIGKILL)  # the replacement dies while generation 1 forms
                seen["replacement"] = event.pid
                return

    coordinator, snapshot = await run(spec, kill_twice)
    assert snapshot.state == JobState.SUCCEEDED, coordinator.failure_report()
    history = coordinator.history()
    assert [e.generation for e in history if isinstance(e, LiveReconfiguring)] == [1]
    [fallback] = [e for e in history if isinstance(e, LiveFallback)]
    assert "rank 1 failed while generation 1 was being formed" in fallback.reason
    assert not [e for e in history if isinstance(e, LiveRecovered)]
    assert [e.attempt for e in history if isinstance(e, AttemptStarted)] == [1, 2]
    assert [f.rank for f in snapshot.failures] == [victim, victim]
    # The group restart resumed from the agreed checkpoint, and the result is the same all the same.
    expected = await reference(tmp_path_factory)
    for rank in range(WORLD):
        assert_same_state(expected, load(out / f"final_r{rank}.pt"), f"final state of rank {rank}")
