"""A job's summary: rates, ETA, recovery times and goodput from sampled snapshots.

The coordinator keeps only the present; summaries need rates and recovery
times, so ``Sampler`` takes the coordinator's snapshot twice a second and
keeps what the summary needs. Pure computation, no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

from rankwarden.api._schema import JobInfo, JobSummary
from rankwarden.coordinator import Coordinator
from rankwarden.events import JobSnapshot

__all__ = ["Sampler", "build_summary", "goodput"]

_SAMPLE = 0.5  # seconds between progress samples
_WINDOW = 10.0  # seconds of samples a rate is computed over


@dataclass
class Sampler:
    coordinator: Coordinator
    started: float = field(default_factory=time.time)
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (time, min step, samples)
    failures_at: list[float] = field(default_factory=list)
    recoveries: list[float] = field(default_factory=list)

    async def run(self) -> None:
        pending_recovery: float | None = None
        attempt_seen = 0
        while True:
            snap = self.coordinator.snapshot()
            now = time.time()
            steps = [r.step for r in snap.ranks]
            if self.failures_at and pending_recovery is None and len(self.recoveries) < len(self.failures_at):
                pending_recovery, attempt_seen = self.failures_at[len(self.recoveries)], snap.attempt
            if all(s is not None for s in steps):
                samples = sum(r.samples or 0 for r in snap.ranks)
                self.samples.append((now, min(steps), samples))  # type: ignore[type-var]
                # Only the window and the goodput need the past: keep it bounded.
                if len(self.samples) > 100_000:
                    del self.samples[: len(self.samples) // 2]
                if pending_recovery is not None and snap.attempt > attempt_seen:
                    self.recoveries.append(now - pending_recovery)
                    pending_recovery = None
            await trio.sleep(_SAMPLE)

    def steps_per_second(self) -> tuple[float | None, float | None]:
        if not self.samples:
            return None, None
        recent = [s for s in self.samples if s[0] >= self.samples[-1][0] - _WINDOW]
        if len(recent) >= 2 and recent[-1][0] > recent[0][0] and recent[-1][1] >= recent[0][1]:
            span = recent[-1][0] - recent[0][0]
            return (recent[-1][1] - recent[0][1]) / span, max(0, recent[-1][2] - recent[0][2]) / span
        return None, None


def build_summary(info: JobInfo, snap: JobSnapshot | None, sampler: Sampler | None) -> JobSummary:
    steps_rate = samples_rate = eta = good = None
    recoveries: list[float] = []
    wall = 0.0
    if sampler is not None:
        wall = (snap.ended_at or time.time()) - sampler.started if snap else 0.0
        steps_rate, samples_rate = sampler.steps_per_second()
        recoveries = [round(r, 3) for r in sampler.recoveries]
        good = goodput(sampler.samples, wall)
    step = min((r.step for r in snap.ranks if r.step is not None), default=None) if snap else None
    total = info.request.total_steps
    if total and step is not None and steps_rate:
        eta = max(0.0, (total - step) / steps_rate)
    return JobSummary(
        job_id=info.job_id, state=info.state, attempt=snap.attempt if snap else info.attempt,
        restarts_used=snap.restarts_used if snap else info.restarts_used,
        max_restarts=info.request.max_restarts, ranks=list(snap.ranks) if snap else [],
        steps_per_second=steps_rate, samples_per_second=samples_rate, step=step, total_steps=total,
        eta_seconds=eta, checkpoint_step=snap.checkpoint_step if snap else None,
        failures=list(snap.failures) if snap else [], recovery_seconds=recoveries, goodput=good,
        wall_seconds=round(wall, 3),
    )


def goodput(samples: list[tuple[float, int, int]], wall: float) -> float | None:
    # Time spent moving past the furthest step reached so far counts as
    # useful; time re-training steps lost to a failure, restarting or waiting does not.
    if wall <= 0 or len(samples) < 2:
        return None
    best, useful = samples[0][1], 0.0
    for (t0, _, _), (t1, step, _) in zip(samples, samples[1:]):
        if step > best:
            useful += t1 - t0
            best = step
    return round(min(1.0, useful / wall), 4)
