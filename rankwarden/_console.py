"""What ``rankwarden run`` shows a person: event lines, rank output, a live status line.

On a terminal the last lines are a live region redrawn in place: each rank's
unfinished line as it is now (a tqdm bar, updating) and the status line
(attempt, each rank's step, steps/s); every other line is printed above it.
Elsewhere (CI logs, pipes) there is no live region, only plain lines, and a
progress bar is printed once, in its final state.

Rank output is read every ``_OUTPUT_REFRESH`` seconds, file by file (as
torchrun's ``--tee`` does): lines a rank writes to stdout and stderr in that
window may come out stdout first; lines further apart keep their order. The
files themselves are written by the rank, in order, per stream.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable, TextIO

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
    RankBusy,
    RankExited,
    RankFailed,
    RankStarted,
    Restarting,
    ResumeChosen,
    Stopping,
)

__all__ = ["Console", "describe_event", "format_status"]

_OUTPUT_REFRESH = 0.1  # seconds between rank-output reads (and live-region redraws)
_STATUS_REFRESH = 0.5  # seconds between snapshots for the status line


def describe_event(event: Event) -> str | None:
    """One human line for an event, or None for events not worth a line."""
    if isinstance(event, JobStarted):
        return f"job {event.job}: {event.world_size} rank(s) of {event.entrypoint}; logs in {event.job_dir}"
    if isinstance(event, AttemptStarted):
        size = f"world size {event.world_size}, " if event.world_size else ""
        return f"attempt {event.attempt} started ({size}MASTER_PORT={event.master_port})"
    if isinstance(event, RankStarted) and event.attempt > 1:  # the first attempt is always fresh
        return f"attempt {event.attempt}: rank {event.rank} started {'warm' if event.warm else 'fresh'} (pid {event.pid})"
    if isinstance(event, RankFailed):
        return f"attempt {event.attempt}: {event.failure.message} [{event.failure.cause.value}]"
    if isinstance(event, RankBusy):
        return f"attempt {event.attempt}: {event.message}"
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
    """``echo(rank, stream)`` says which rank output is shown (torchrun's
    --redirects, --tee and --local-ranks-filter); ``announce_start=False`` when
    the caller printed its own first line."""

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        echo_ranks: bool,
        out: TextIO = sys.stdout,
        err: TextIO = sys.stderr,
        echo: Callable[[int, str], bool] | None = None,
        announce_start: bool = True,
    ) -> None:
        self.coordinator = coordinator
        self.echo_ranks = echo_ranks
        self.echo = echo or (lambda rank, stream: True)
        self.announce_start = announce_start
        self.out = out
        self.err = err
        self.live = err.isatty()
        self._region: list[str] = []  # the live lines on screen now, top to bottom
        self._status = ""
        self._tail = RankOutputTail(coordinator.job_dir)

    def _clear_status(self) -> None:
        """Erase the live region (the cursor is at the end of its last line)."""
        if self._region:
            self.err.write("\r\x1b[K" + "\x1b[1A\x1b[K" * (len(self._region) - 1))
            self._region = []

    def _draw_region(self) -> None:
        if not self.live:
            return
        width = _width(self.err)
        region = [
            f"[rank{line.rank}]: {_strip_rank_prefix(line.rank, line.text.decode(errors='replace'))}"[:width]
            for line in self._tail.partials if self.echo(line.rank, line.stream)
        ] if self.echo_ranks else []
        if self._status and not self.coordinator.state.finished:
            region.append(self._status[:width])
        if region != self._region:
            self._clear_status()
            self.err.write("\n".join(region))
            self._region = region
        self.err.flush()

    def line(self, text: str, *, stream: TextIO | None = None) -> None:
        self._clear_status()
        stream = stream or self.err
        stream.write(text + "\n")
        stream.flush()

    async def show_events(self) -> None:
        async for event in self.coordinator.events():
            if isinstance(event, JobStarted) and not self.announce_start:
                continue
            # What the ranks wrote before this event comes first: a rank's
            # traceback before the "restarting" line that its exit caused.
            self.copy_rank_output()
            if isinstance(event, JobFailedEvent):
                self.copy_rank_output(final=True)
                self.line("rankwarden: " + self.with_root_cause_output(event))
                continue
            text = describe_event(event)
            if text is not None:
                self.line(f"rankwarden: {text}")

    def with_root_cause_output(self, event: JobFailedEvent, lines: int = 10) -> str:
        """The failure report, the root-cause line followed by what the failing
        rank said last: torch's @record error file if it wrote one, and the
        last lines of its stderr."""
        if not event.failures:
            return event.message
        first = event.failures[0]
        job_dir = self.coordinator.job_dir
        extra = []
        error = job_dir.error_summary(first.rank, first.attempt)
        if error:
            extra.append(f"  error file: {error}")
        tail = job_dir.stderr_tail(first.rank, first.attempt, lines)
        if tail:
            stderr = job_dir.log_paths(first.rank, first.attempt)[1]
            extra.append(f"  last {len(tail)} line(s) of rank {first.rank}'s stderr ({stderr}):")
            extra += [f"    {_strip_rank_prefix(first.rank, line)}" for line in tail]
        out = []
        for line in event.message.splitlines():
            out.append(line)
            if line.startswith("Root cause"):
                out += extra
                extra = []
        return "\n".join(out + extra)

    async def refresh(self) -> None:
        """Copy new rank output and redraw the live region, until cancelled.

        A display refresh, not liveness: nothing is decided from it."""
        ticks = round(_STATUS_REFRESH / _OUTPUT_REFRESH)
        for tick in range(sys.maxsize):
            self.copy_rank_output()
            if self.live:
                if tick % ticks == 0:
                    self._status = format_status(self.coordinator.snapshot())
                self._draw_region()
            await trio.sleep(_OUTPUT_REFRESH)

    def copy_rank_output(self, *, final: bool = False) -> None:
        if not self.echo_ranks:
            return
        ranks = [(r.rank, r.attempt) for r in self.coordinator.snapshot().ranks]
        for line in self._tail.read(ranks, final=final):
            if not self.echo(line.rank, line.stream):
                continue
            stream = self.err if line.stream == "stderr" else self.out
            text = _strip_rank_prefix(line.rank, line.text.decode(errors="replace"))
            self.line(f"[rank{line.rank}]: {text}", stream=stream)

    def finish(self) -> None:
        self.copy_rank_output(final=True)
        self._clear_status()


def _width(stream: TextIO) -> int:
    """Columns a live line may use: one less than the terminal's (a full line would wrap)."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns - 1 if columns > 1 else 200


def _strip_rank_prefix(rank: int, text: str) -> str:
    # torch.distributed already prefixes a rank's traceback lines "[rank0]: ";
    # ours would double it.
    prefix = f"[rank{rank}]:"
    return text[len(prefix):].lstrip(" ") if text.startswith(prefix) else text


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
