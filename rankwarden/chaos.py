"""``rankwarden chaos``: break a training job on purpose, then prove nothing was lost.

1. Run the job (by default ``demo/train.py``) with a coordinator and a fault
   injector beside it. Fault ``i`` is planned at an absolute step a few steps
   past the ``i+1``-th checkpoint (``ckpt_every * (i + 1) + offset``), once
   that checkpoint is committed, so every fault resumes from a committed step
   and not from step 0: the run proves resume, not only restart. It then hits
   one rank with one of:

   ============  ====================================================  =====================
   kill          SIGKILL                                               process exit
   stop          SIGSTOP (frozen)                                      heartbeat_timeout
   hang          SIGUSR1: the script blocks, heartbeats go on          progress_timeout
   kill-in-save  SIGUSR2: the script SIGKILLs itself mid checkpoint    process exit
   ============  ====================================================  =====================

   Kinds, ranks and fault steps come from one seed.
2. Run the same job again with no faults.
3. Compare: the final weights must be bit-identical (CPU, gloo, same seed,
   same world size), the committed checkpoint steps must never go
   backwards, and at least two faults (or every fault, if fewer are planned)
   must have resumed from a non-zero committed step, as the coordinator's
   ``resume_chosen`` events report. Exit status 0 only if all hold and the
   job succeeded.

The injector is an observer: it samples coordinator snapshots to time its
faults. Detection and recovery are measured from the moment of the fault.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import trio

from rankwarden.coordinator import Coordinator
from rankwarden.events import CheckpointCommitted, JobState, LiveFallback, LiveRecovered, ResumeChosen
from rankwarden.spec import JobSpec

__all__ = ["KINDS", "ChaosReport", "FaultRecord", "run_chaos"]

KINDS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "hang": signal.SIGUSR1, "kill-in-save": signal.SIGUSR2}


@dataclass
class FaultRecord:
    kind: str
    rank: int
    attempt: int
    step: int
    cause: str = ""
    detect: float = math.nan
    recover: float = math.nan
    resumed_from: int = 0
    redone: int = 0


@dataclass
class ChaosReport:
    faults: list[FaultRecord] = field(default_factory=list)
    planned: int = 0
    state: str = ""
    attempts: int = 0
    committed: list[int] = field(default_factory=list)
    clean_committed: list[int] = field(default_factory=list)
    identical: bool = False
    mismatch: str = ""
    accuracy: str = ""
    seconds: float = 0.0
    clean_seconds: float = 0.0
    #: ``--live``: faults are recovered by replacing the failed rank; each may redo only the interrupted step.
    live: bool = False
    #: Live mode: reconfigurations that fell back to a group restart.
    fallbacks: int = 0

    @property
    def monotonic(self) -> bool:
        return all(a < b for a, b in zip(self.committed, self.committed[1:]))

    @property
    def resumed_from_a_checkpoint(self) -> int:
        """Faults after which the job resumed from a committed step other than 0."""
        return sum(1 for f in self.faults if f.resumed_from > 0)

    @property
    def resume_needed(self) -> int:
        return min(2, self.planned)

    @property
    def live_ok(self) -> bool:
        """Live mode: every fault was recovered live (no group restart) and redid at most the interrupted step."""
        return self.fallbacks == 0 and self.attempts <= 1 and all(f.redone <= 1 for f in self.faults)

    @property
    def ok(self) -> bool:
        return (self.state == "succeeded" and self.identical and self.monotonic and len(self.faults) == self.planned
                and all(not math.isnan(f.recover) for f in self.faults)
                and self.resumed_from_a_checkpoint >= self.resume_needed
                and (not self.live or self.live_ok))

    def render(self) -> str:
        by_kind: dict[str, int] = {}
        for f in self.faults:
            by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        lines = [f"{'fault':13} {'rank':>4} {'attempt':>7} {'at step':>7} {'detected as':18} {'detect s':>8} "
                 f"{'recover s':>9} {'resumed':>7} {'redone':>6}"]
        for f in self.faults:
            lines.append(f"{f.kind:13} {f.rank:>4} {f.attempt:>7} {f.step:>7} {f.cause:18} {f.detect:>8.2f} "
                         f"{f.recover:>9.2f} {f.resumed_from:>7} {f.redone:>6}")
        if self.faults:
            lines.append(f"median detect {_median([f.detect for f in self.faults]):.2f}s, median recover "
                         f"{_median([f.recover for f in self.faults]):.2f}s, steps redone {sum(f.redone for f in self.faults)}")
        lines += [
            "",
            f"faults injected: {len(self.faults)} of {self.planned} planned ({', '.join(f'{k} {n}' for k, n in sorted(by_kind.items()))})",
            f"chaos run: {self.state} after {self.attempts} attempts in {self.seconds:.1f}s; fault-free run: {self.clean_seconds:.1f}s",
            f"committed steps never went backwards: {'yes' if self.monotonic else 'NO'} ({len(self.committed)} commits, "
            f"last {self.committed[-1] if self.committed else None})",
            f"faults resumed from {'a survivor' if self.live else 'a committed step'} (not step 0): "
            f"{self.resumed_from_a_checkpoint} "
            f"({'enough' if self.resumed_from_a_checkpoint >= self.resume_needed else 'NOT enough'}: "
            f"at least {self.resume_needed} needed to prove resume)",
            f"final weights bit-identical to the fault-free run: {'yes' if self.identical else 'NO ' + self.mismatch}",
        ]
        if self.live:
            worst = max((f.redone for f in self.faults), default=0)
            lines.append(
                f"live: every fault recovered without a group restart, at most the interrupted step redone: "
                f"{'yes' if self.live_ok else 'NO'} ({self.attempts} attempt(s), {self.fallbacks} fallback(s), "
                f"most steps redone by one fault: {worst})")
        if self.accuracy:
            lines.append(self.accuracy)
        lines.append(f"RESULT: {'OK: nothing was lost' if self.ok else 'FAILED'}")
        return "\n".join(lines)


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if not math.isnan(v))
    return values[len(values) // 2] if values else math.nan


def plan_faults(count: int, kinds: list[str], world_size: int, seed: int,
                ckpt_every: int = 16) -> list[tuple[str, int, int]]:
    """(kind, rank, step) of each fault; every kind equally often, order from the seed.

    Fault ``i`` strikes a few steps after the ``i+1``-th checkpoint
    (``ckpt_every * (i + 1)``): it can only resume from a committed, non-zero
    step. (A fault placed relative to the last resume, as before, could keep
    landing before the first checkpoint, and a run that only ever restarted
    from step 0 proved nothing about resume.)"""
    if ckpt_every < 4:
        raise ValueError(f"ckpt_every must be at least 4 to leave room between a commit and a fault, got {ckpt_every}")
    rng = random.Random(seed)
    chosen = (kinds * (count // len(kinds) + 1))[:count]
    rng.shuffle(chosen)
    return [(kind, rng.randrange(world_size), ckpt_every * (i + 1) + rng.randint(2, ckpt_every - 2))
            for i, kind in enumerate(chosen)]


async def _observe(predicate: Callable[[], object], limit: float):
    # Sampling a snapshot is the injector's view of the world, not the coordinator's logic.
    with trio.fail_after(limit):
        while not (value := predicate()):
            await trio.sleep(0.01)
    return value


async def _inject(coordinator: Coordinator, plan, chaos_dir: str, report: ChaosReport, limit: float,
                  echo: Callable[[str], None], resumes: dict[int, int | None], ckpt_every: int,
                  lives: list[LiveRecovered]) -> None:
    for kind, rank, at_step in plan:
        def training():
            snap = coordinator.snapshot()
            steps = [r.step for r in snap.ranks]
            if snap.state != JobState.RUNNING or any(s is None for s in steps):
                return None
            committed = snap.checkpoint_step or 0
            return snap if min(steps) >= at_step and committed >= at_step // ckpt_every * ckpt_every else None

        snap = await _observe(training, limit)
        if snap.state.finished:
            return
        pid, step, attempt = snap.ranks[rank].pid, snap.ranks[rank].step, snap.attempt
        seen = len(coordinator.failures)
        lives_before = len(lives)
        t_fault = time.time()
        os.kill(pid, KINDS[kind])
        record = FaultRecord(kind=kind, rank=rank, attempt=attempt, step=step)
        failure = (await _observe(lambda: coordinator.failures[seen:], limit))[0]
        if kind == "kill-in-save":
            marker = os.path.join(chaos_dir, f"fault-{pid}")
            if os.path.exists(marker):
                with open(marker) as f:
                    t_fault = float(f.read())
        record.cause = failure.cause.value
        record.detect = failure.detected_at - t_fault
        at_detection = coordinator.snapshot()
        reached = max(r.step or 0 for r in at_detection.ranks)

        def recovered():
            # Training again: a new attempt, or (live) a new process group, and every
            # rank, the replacement included, has reported a step in it.
            now = coordinator.snapshot()
            if ((now.attempt > attempt or len(lives) > lives_before) and now.state == JobState.RUNNING
                    and all(r.step is not None for r in now.ranks)):
                return now
            return None

        now = await _observe(recovered, limit)
        record.recover = time.time() - t_fault
        if now.attempt > attempt:
            # What the coordinator told every rank of the new attempt to load.
            record.resumed_from = resumes.get(now.attempt) or 0
        else:
            # Live: the step whose state every rank took from a survivor.
            record.resumed_from = lives[lives_before].step
        record.redone = max(0, reached - record.resumed_from)
        report.faults.append(record)
        echo(f"fault {len(report.faults)}/{len(plan)}: {kind} rank {rank} at step {step} -> detected as "
             f"{record.cause} in {record.detect:.2f}s, training again after {record.recover:.2f}s "
             f"(from step {record.resumed_from})")


async def _run_job(spec: JobSpec, plan, chaos_dir: str, report: ChaosReport | None, limit: float,
                   echo: Callable[[str], None], ckpt_every: int) -> tuple[JobState, int, list[int]]:
    coordinator = Coordinator(spec)
    committed: list[int] = []
    resumes: dict[int, int | None] = {}
    lives: list[LiveRecovered] = []

    async def watch():
        async for event in coordinator.events():
            if isinstance(event, CheckpointCommitted):
                committed.append(event.step)
            elif isinstance(event, ResumeChosen):
                resumes[event.attempt] = event.step
            elif isinstance(event, LiveRecovered):
                lives.append(event)
            elif isinstance(event, LiveFallback) and report is not None:
                report.fallbacks += 1

    with trio.fail_after(limit * (len(plan) + 2)):
        async with trio.open_nursery() as nursery:
            await nursery.start(coordinator.run)
            nursery.start_soon(watch)
            if plan:
                nursery.start_soon(_inject, coordinator, plan, chaos_dir, report, limit, echo, resumes, ckpt_every, lives)
            snapshot = await coordinator.wait()
            nursery.cancel_scope.cancel()
    return snapshot.state, snapshot.attempt, committed


def _compare_weights(a: str, b: str) -> tuple[bool, str]:
    import torch

    if not (os.path.exists(a) and os.path.exists(b)):
        return False, "(a run wrote no final weights)"
    left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if list(left) != list(right):
        return False, "(different parameters)"
    for key in left:
        if not torch.equal(left[key], right[key]):
            return False, f"({key} differs by up to {(left[key] - right[key]).abs().max().item():.3g})"
    return True, ""


def run_chaos(
    *,
    script: str,
    data: str,
    job_dir: str,
    faults: int = 4,
    kinds: list[str] | None = None,
    seed: int = 0,
    world_size: int = 2,
    epochs: int = 2,
    heartbeat_timeout: float = 3.0,
    progress_timeout: float = 4.0,
    ckpt_every: int = 16,
    limit: float = 120.0,
    echo: Callable[[str], None] = print,
    sharded: bool = False,
    live: bool = False,
) -> ChaosReport:
    """Both runs; ``sharded`` trains with FSDP2 and checkpoints through DCP (the script's ``--sharded``);
    ``live`` runs the faulty job live (the script's ``--live``, ``JobSpec.live``): the fault-free run is
    the same plain job, so the comparison also proves that live recovery changes nothing."""
    kinds = kinds or list(KINDS)
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown fault kinds {sorted(unknown)}; choose from {sorted(KINDS)}")
    make_dataset = os.path.join(os.path.dirname(os.path.abspath(script)), "make_dataset.py")
    if not os.path.exists(os.path.join(data, "index.json")):
        echo(f"making the dataset in {data}")
        subprocess.run([sys.executable, make_dataset, "--out", data], check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(job_dir, ignore_errors=True)
    if live and sharded:
        raise ValueError("live recovery is for replicated (DDP) training: --live and --sharded cannot be combined")
    report = ChaosReport(planned=faults, live=live)
    plan = plan_faults(faults, kinds, world_size, seed, ckpt_every)

    def spec(name: str, n_faults: int, live: bool = False) -> JobSpec:
        root = os.path.abspath(os.path.join(job_dir, name))
        os.makedirs(root, exist_ok=True)
        return JobSpec(
            entrypoint=script,
            args=["--data", data, "--epochs", str(epochs), "--seed", str(seed), "--ckpt-every", str(ckpt_every),
                  "--final-weights", os.path.join(root, "final.pt"), *(["--sharded"] if sharded else []),
                  *(["--live"] if live else [])],
            world_size=world_size, job_id=f"chaos-{name}", job_dir=os.path.join(root, "job"),
            checkpoint_url=os.path.join(root, "checkpoints"), heartbeat_timeout=heartbeat_timeout,
            heartbeat_interval=min(0.1, heartbeat_timeout / 5),
            progress_timeout=progress_timeout, max_restarts=n_faults + 2, backoff={"initial": 0.1, "max": 1.0},
            kill_grace=2.0, env={"RANKWARDEN_CHAOS_DIR": root}, live=live,
        )

    started = time.time()
    echo(f"chaos run: {faults} faults ({', '.join(kinds)}), seed {seed}, {world_size} ranks"
         + (", FSDP2 with sharded checkpoints" if sharded else "") + (", live recovery" if live else ""))
    state, attempts, report.committed = trio.run(_run_job, spec("faults", faults, live), plan,
                                                os.path.abspath(os.path.join(job_dir, "faults")), report, limit, echo,
                                                ckpt_every)
    report.state, report.attempts, report.seconds = state.value, attempts, time.time() - started
    started = time.time()
    echo("fault-free run of the same job")
    clean_state, _, report.clean_committed = trio.run(_run_job, spec("clean", 0), [], "", None, limit, echo, ckpt_every)
    report.clean_seconds = time.time() - started
    if clean_state != JobState.SUCCEEDED:
        report.mismatch = f"(the fault-free run ended {clean_state.value})"
    else:
        report.identical, report.mismatch = _compare_weights(
            os.path.join(job_dir, "faults", "final.pt"), os.path.join(job_dir, "clean", "final.pt"))
    out = os.path.join(job_dir, "faults", "job", f"attempt_{attempts:03d}", "rank_0.stdout")
    if os.path.exists(out):
        with open(out) as f:
            lines = [line.strip() for line in f if "accuracy" in line]
        report.accuracy = lines[-1] if lines else ""
    with open(os.path.join(job_dir, "report.json"), "w") as f:
        json.dump({"ok": report.ok, "faults": [vars(x) for x in report.faults], "committed": report.committed,
                   "identical": report.identical, "state": report.state}, f, indent=1)
    return report
