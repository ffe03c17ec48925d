"""What ``rankwarden run`` shows a person: event lines, rank output, a live status line.

On a terminal the last line is a status line redrawn in place (attempt, each
rank's step, steps/s); every other line is printed above it. Elsewhere (CI
logs, pipes) there is no status line, only plain lines.
"""

from __future__ import annotations

import signal
import sys
from typing import TextIO

import trio

from rankwarden.coordinator import Coordinator
from rankwarden.coordinator._jobdir import RankOutputTail
from rankwarden.events import (
    AttemptStarted,
    CheckpointFailedEvent,
    Event,
    JobFailedEvent,
    JobSnapshot,
    JobStarted,
    JobStopped,
    JobSucceeded,
    PeerRejected,
    RankExited,
    RankFailed,
    RankStarted,
    Restarting,
    ResumeChosen,
    Stopping,
)

__all__ = ["Console", "describe_event", "format_status"]

_REFRESH = 0.5  # seconds between status redraws and rank-output reads


def describe_event(event: Event) -> str | None:
    """One human line for an event, or None for events not worth a line."""
    if isinstance(event, JobStarted):
        return f"job {event.job}: {event.world_size} rank(s) of {event.entrypoint}; logs in {event.job_dir}"
    if isinstance(event, AttemptStarted):
        return f"attempt {event.attempt} started (MASTER_PORT={event.master_port})"
    if isinstance(event, RankStarted) and event.attempt > 1:  # the first attempt is always fresh
        return f"attempt {event.attempt}: rank {event.rank} started {'warm' if event.warm else 'fresh'} (pid {event.pid})"
    if isinstance(event, RankFailed):
        return f"attempt {event.attempt}: {event.failure.message} [{event.failure.cause.value}]"
    if isinstance(event, RankExited) and event.note:
        return f"attempt {event.attempt}: rank {event.rank} {event.note}"
    if isinstance(event, PeerRejected):
        return f"dropped heartbeat peer {event.peer}: {event.reason}"
    if isinstance(event, Restarting):
        who = "all ranks" if event.rank is None else f"rank {event.rank}"
        return f"restarting {who} in {event.delay:.1f}s (restart {event.restart} of {event.max_restarts})"
    if isinstance(event, ResumeChosen):
        return f"attempt {event.attempt}{'' if event.rank is None else f', rank {event.rank}'}: {event.message}"
    if isinstance(event, CheckpointFailedEvent):
        return f"checkpoint step {event.step} failed: {event.error}"
    if isinstance(event, Stopping):
        return f"stopping: {event.reason}"
    if isinstance(event, JobSucceeded):
        return f"job {event.job} succeeded (attempt {event.attempt})"
    if isinstance(event, JobFailedEvent):
        return event.message
    if isinstance(event, JobStopped):
        return f"job {event.job} stopped: {event.reason}"
    return None


def format_status(snapshot: JobSnapshot) -> str:
    steps = " ".join(f"r{r.rank}={'-' if r.step is None else r.step}" for r in snapshot.ranks)
    rates = [r.steps_per_second for r in snapshot.ranks if r.steps_per_second is not None]
    rate = f"{min(rates):.2f} steps/s" if rates else "-- steps/s"
    checkpoint = "" if snapshot.checkpoint_step is None else f" | ckpt {snapshot.checkpoint_step}"
    return (
        f"[rankwarden] attempt {snapshot.attempt} {snapshot.state.value} | step {steps} | {rate} | "
        f"restarts {snapshot.restarts_used}/{snapshot.max_restarts}{checkpoint}"
    )


class Console:
    def __init__(self, coordinator: Coordinator, *, echo_ranks: bool, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.coordinator = coordinator
        self.echo_ranks = echo_ranks
        self.out = out
        self.err = err
        self.live = err.isatty()
        self._status_shown = False
        self._tail = RankOutputTail(coordinator.job_dir)

    def _clear_status(self) -> None:
        if self._status_shown:
            self.err.write("\r\x1b[K")
            self._status_shown = False

    def line(self, text: str, *, stream: TextIO | None = None) -> None:
        self._clear_status()
        stream = stream or self.err
        stream.write(text + "\n")
        stream.flush()

    async def show_events(self) -> None:
        async for event in self.coordinator.events():
            text = describe_event(event)
            if text is not None:
                self.line(f"rankwarden: {text}")

    async def refresh(self) -> None:
        """Redraw the status line and copy new rank output, until cancelled.

        A display refresh, not liveness: nothing is decided from it."""
        while True:
            self.copy_rank_output()
            if self.live and not self.coordinator.state.finished:
                self._clear_status()
                self.err.write(format_status(self.coordinator.snapshot())[:200])
                self.err.flush()
                self._status_shown = True
            await trio.sleep(_REFRESH)

    def copy_rank_output(self, *, final: bool = False) -> None:
        if not self.echo_ranks:
            return
        ranks = [(r.rank, r.attempt) for r in self.coordinator.snapshot().ranks]
        for line in self._tail.read(ranks, final=final):
            stream = self.err if line.stream == "stderr" else self.out
            self.line(f"[rank{line.rank}]: {line.text.decode(errors='replace')}", stream=stream)

    def finish(self) -> None:
        self.copy_rank_output(final=True)
        self._clear_status()


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
