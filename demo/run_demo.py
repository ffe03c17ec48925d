"""`make demo`: a real 2-rank DDP job on CPU that survives a kill -9, a frozen rank and a hung rank.

It uses rankwarden as a library, the way a custom launcher would: build a
JobSpec, run a Coordinator in a Trio nursery, watch its events and snapshots.
Next to it runs a fault injector that, once each attempt is training, does
one of: kill -9 a rank (torchrun sees this), SIGSTOP a rank (frozen:
torchrun would wait for the collective timeout), or make a rank hang while
its process stays alive and heartbeating (a deadlock: torchrun cannot see it).
At the end it prints what was injected, how fast each was detected and
recovered, and the trained model's held-out accuracy.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time

import trio

import rankwarden
from rankwarden.events import AttemptStarted, JobFailedEvent, JobStopped, JobSucceeded, RankFailed, Restarting

HERE = os.path.dirname(os.path.abspath(__file__))
FAULTS = [
    ("kill -9", signal.SIGKILL, 1),
    ("SIGSTOP (frozen rank)", signal.SIGSTOP, 0),
    ("hang (alive, heartbeating, no progress)", signal.SIGUSR1, 1),
]


def say(text: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {text}", flush=True)


async def show_events(coordinator: rankwarden.Coordinator) -> None:
    async for event in coordinator.events():
        if isinstance(event, AttemptStarted):
            say(f"attempt {event.attempt} started (MASTER_PORT={event.master_port})")
        elif isinstance(event, RankFailed):
            f = event.failure
            say(f"DETECTED [{f.cause.value}] {f.message}")
        elif isinstance(event, Restarting):
            say(f"restarting all ranks in {event.delay:.2f}s (restart {event.restart} of {event.max_restarts})")
        elif isinstance(event, JobSucceeded):
            say("job succeeded")
        elif isinstance(event, (JobStopped, JobFailedEvent)):
            say(f"job ended: {type(event).__name__}")


async def wait_for(predicate, what: str, timeout: float = 120.0):
    # The demo is an observer: it samples snapshots; the coordinator itself never polls.
    with trio.fail_after(timeout):
        while not (value := predicate()):
            await trio.sleep(0.02)
    return value


async def inject_faults(coordinator: rankwarden.Coordinator, results: list[dict], warmup_steps: int) -> None:
    for index, (name, signum, rank) in enumerate(FAULTS):
        attempt = index + 1

        def training():
            snap = coordinator.snapshot()
            if snap.attempt != attempt:
                return None
            steps = [r.step for r in snap.ranks]
            if any(s is None for s in steps):
                return None
            base = results[-1]["resumed_at"] if results else 0
            return snap if min(steps) >= base + warmup_steps else None

        snap = await wait_for(training, f"attempt {attempt} training")
        pid, step = snap.ranks[rank].pid, snap.ranks[rank].step
        failures_before = len(coordinator.failures)
        say(f"INJECT {name} into rank {rank} (pid {pid}) at step {step}")
        t_fault = time.time()
        os.kill(pid, signum)
        failure = (await wait_for(lambda: coordinator.failures[failures_before:], "detection"))[0]
        detected = failure.detected_at - t_fault
        # The furthest any rank got in the failed attempt (heartbeats lag by up to one interval).
        reached = max(r.step or 0 for r in coordinator.snapshot().ranks)

        def recovered():
            snap = coordinator.snapshot()
            if snap.attempt == attempt + 1 and all(r.step is not None for r in snap.ranks):
                return snap
            return None

        snap = await wait_for(recovered, "recovery")
        t_recovered = time.time()
        resumed_at = min(r.step for r in snap.ranks) - 1
        results.append(
            dict(fault=name, rank=rank, step=step, cause=failure.cause.value, detect=detected,
                 recover=t_recovered - t_fault, resumed_at=resumed_at, redone=max(0, reached - resumed_at))
        )
        say(f"RECOVERED: attempt {attempt + 1} training again from step {resumed_at} "
            f"({t_recovered - t_fault:.2f}s after the fault)")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-time", type=float, default=0.02)
    parser.add_argument("--job-dir", default="rankwarden-jobs/demo")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the events below say it all

    shutil.rmtree(args.job_dir, ignore_errors=True)  # a fresh run, not a resume of the last demo
    ckpt_dir = os.path.join(args.job_dir, "checkpoints")
    spec = rankwarden.JobSpec(
        entrypoint=os.path.join(HERE, "ddp_train.py"),
        args=["--steps", str(args.steps), "--ckpt-dir", ckpt_dir, "--step-time", str(args.step_time)],
        world_size=2,
        job_id="demo",
        job_dir=args.job_dir,
        heartbeat_timeout=3.0,
        progress_timeout=4.0,
        max_restarts=len(FAULTS) + 1,
        backoff=rankwarden.Backoff(initial=0.25, max=2.0),
        kill_grace=2.0,
    )
    coordinator = rankwarden.Coordinator(spec)
    results: list[dict] = []
    say(f"training 2 DDP ranks on {'CUDA/NCCL' if _cuda() else 'CPU/gloo'}; logs in {args.job_dir}")
    t0 = time.time()
    async with trio.open_nursery() as nursery:
        await nursery.start(coordinator.run)
        nursery.start_soon(show_events, coordinator)
        nursery.start_soon(inject_faults, coordinator, results, 15)
        snapshot = await coordinator.wait()
        nursery.cancel_scope.cancel()

    print()
    # detect: fault -> coordinator's verdict; recover: fault -> every rank of the
    # next attempt reported a step; redone: steps trained after the checkpoint resumed from.
    print(f"{'fault':42} {'rank':>4} {'at step':>7} {'detected as':18} {'detect s':>8} {'recover s':>9} {'redone':>6}")
    for r in results:
        print(f"{r['fault']:42} {r['rank']:>4} {r['step']:>7} {r['cause']:18} {r['detect']:>8.2f} {r['recover']:>9.2f} {r['redone']:>6}")
    out = os.path.join(args.job_dir, f"attempt_{snapshot.attempt:03d}", "rank_0.stdout")
    final = []
    if os.path.exists(out):
        with open(out) as f:
            final = [line for line in f.read().splitlines() if "accuracy" in line]
    print()
    print(f"job {snapshot.state.value} after {snapshot.attempt} attempts in {time.time() - t0:.1f}s; "
          f"{len(results)} of {len(FAULTS)} faults injected, all recovered: {len(results) == len(FAULTS)}")
    if final:
        print(final[-1])
    ok = snapshot.state == rankwarden.JobState.SUCCEEDED and len(results) == len(FAULTS)
    return 0 if ok else 1


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(trio.run(main))
