"""Live recovery, coordinator side: replace one failed rank; the survivors keep their processes.

One ``LiveSession`` lives for one group attempt of a live job (``JobSpec.live``).
It runs a reconfiguration each time a rank fails:

1. Verdict first. The failed rank's runner has ended: its process was
   SIGKILLed (no grace in live mode: a SIGSTOPped or hung rank too) and
   reaped, so its sockets are closed and every collective blocked on it fails.
   Only then does the session act: it picks a fresh MASTER_PORT, sends the
   survivors ``Abort`` (NCCL does not always notice a dead peer), pauses their
   progress deadlines (they wait at the step boundary; heartbeats are still
   watched) and starts a replacement (warm where the launcher can), whose
   Welcome names the new generation and whose MASTER_PORT is the new one.
2. Each survivor, its collective failed, reports ``LiveReady`` with the last
   step it applied. A survivor can report before the coordinator has seen the
   failure (a kill -9 closes sockets a moment before the exit is reported);
   such a report starts the reconfiguration, and the failure then joins it.
   Ranks whose collective timed out on a hung peer report too: the hung rank
   is the one that does not, and its progress deadline kills it.
3. When every rank is either ready or replaced, every survivor gets
   ``Reconfigure`` (new address and port). All ranks, the replacement
   included, form the new process group, agree in it on the source (highest
   applied step; see ``rankwarden.worker._live`` for why that is correct)
   and report ``LiveJoined``. When all have, the generation is recovered.

Fallback to a group restart (the caller cancels the attempt; the restart
policy resumes from the agreed checkpoint): a failure of a rank that is
already part of the reconfiguration (a ready survivor, a replacement) or
of any rank after ``Reconfigure`` went out; a rank that never announced
live mode; a reconfiguration that has not finished within ``live_timeout``;
a spent restart budget. A slower recovery, never a wrong state.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import trio

from rankwarden import protocol
from rankwarden.coordinator._rank import RankRunner
from rankwarden.coordinator._request import free_port
from rankwarden.events import LiveFallback, LiveReconfiguring, LiveRecovered

if TYPE_CHECKING:  # pragma: no cover
    from rankwarden.coordinator._job import Coordinator

__all__ = ["LiveSession"]

log = logging.getLogger("rankwarden.coordinator._job")


class LiveSession:
    def __init__(self, job: "Coordinator", attempt: int, fallback: Callable[[str], None]) -> None:
        self.job = job
        self.attempt = attempt
        self._fallback_cb = fallback
        #: The process group generation the ranks train in.
        self.generation = 0
        self.target: int | None = None
        self._ready: dict[int, int] = {}
        self._replaced: set[int] = set()
        self._joined: dict[int, tuple[int, int]] = {}
        self._sent = False
        self._began = 0.0
        self._reason = ""
        self._changed = trio.Event()
        self.failed = False

    # -- called by the restart policy ---------------------------------------------------

    def replace(self, runner: RankRunner) -> RankRunner | None:
        """``runner`` failed (its process is gone): its replacement to run, or None to fall back."""
        job = self.job
        rank = runner.rank
        failure = runner.snapshot()
        if self.failed:
            return None
        if self.target is not None and (rank in self._ready or rank in self._replaced or self._sent):
            return self._fall_back(f"rank {rank} failed while generation {self.target} was being formed")
        others = [r for r in job._runners.values() if r.rank != rank]
        not_live = [r.rank for r in others if r.live_generation is None and r.rank not in self._replaced]
        if not_live:
            return self._fall_back(f"rank(s) {not_live} never started live training (rankwarden.worker.live)")
        if self.target is None:
            if job._restarts_used >= job.spec.max_restarts:
                return None  # the group path reports the spent budget
            self._begin(f"rank {rank} failed (step {failure.step})")
        assert self.target is not None
        self._replaced.add(rank)
        for other in others:
            other.pause_progress()
            other.send(protocol.Abort(generation=self.generation, reason=f"rank {rank} failed"))
        replacement = RankRunner(job, rank, self.attempt, resume=self._resume(), live_generation=self.target)
        job._runners[rank] = replacement
        job.emit(LiveReconfiguring, attempt=self.attempt, generation=self.target, ranks=sorted(self._replaced),
                 master_port=job._master_port or 0, reason=f"rank {rank} failed",
                 restart=job._restarts_used, max_restarts=job.spec.max_restarts)
        self._maybe_reconfigure()
        return replacement

    async def watch(self) -> None:
        """Falls back when a reconfiguration has not finished within ``live_timeout``."""
        while True:
            await self._changed.wait()
            self._changed = trio.Event()
            if self.target is None or self.failed:
                continue
            target = self.target
            with trio.move_on_at(self._began + self.job.spec.live_timeout):
                while self.target == target and not self.failed:
                    await self._changed.wait()
                    self._changed = trio.Event()
            if self.target == target and not self.failed:
                missing = sorted(set(range(self.job.world_size)) - set(self._joined))
                self._fall_back(f"ranks {missing} did not rejoin within live_timeout={self.job.spec.live_timeout:g}s")

    # -- called by the coordinator for the ranks' messages ----------------------------------

    def on_message(self, runner: RankRunner, message) -> None:
        if self.failed:
            return
        if isinstance(message, protocol.LiveJoined):
            if message.generation == self.generation and self.target is None:
                runner.live_generation = message.generation  # the script's first live step
            elif message.generation == self.target:
                runner.live_generation = message.generation
                self._joined[runner.rank] = (message.step, message.source)
                runner.resume_progress()
                if len(self._joined) == self.job.world_size:
                    self._recovered()
            return
        if isinstance(message, protocol.LiveReady) and message.generation == self.generation:
            if self.target is None:
                if self.job._restarts_used >= self.job.spec.max_restarts:
                    return  # no budget: the failure that follows restarts nothing live
                self._begin(f"rank {runner.rank} reported a failed collective: {message.error.splitlines()[0] if message.error else ''}")
            self._ready[runner.rank] = message.step
            runner.pause_progress()
            self._maybe_reconfigure()

    # -- internals ------------------------------------------------------------------------

    def _begin(self, reason: str) -> None:
        job = self.job
        self.target = self.generation + 1
        self._ready, self._replaced, self._joined, self._sent = {}, set(), {}, False
        self._began = trio.current_time()
        self._reason = reason
        job._restarts_used += 1
        job._master_port = free_port(job.spec.master_addr, exclude=job._master_port)
        log.info("job=%s attempt=%d: live reconfiguration to generation %d (MASTER_PORT=%d): %s",
                 job.job_id, self.attempt, self.target, job._master_port, reason)
        self._changed.set()

    def _resume(self) -> protocol.Resume | None:
        # A replacement takes its state from a survivor: it must not read storage.
        return protocol.Resume(step=None) if self.job._committer is not None else None

    def _maybe_reconfigure(self) -> None:
        world = self.job.world_size
        if self._sent or self.target is None or len(set(self._ready) | self._replaced) < world:
            return
        self._sent = True
        job = self.job
        for rank in sorted(self._ready):
            job._runners[rank].send(protocol.Reconfigure(
                generation=self.target, master_addr=job.spec.master_addr, master_port=job._master_port or 0,
                world_size=world, rank=rank,
            ))
        if not self._replaced:
            # Every rank reported a failed collective and none failed (a slow
            # rank, a collective timeout): the same ranks form a new group.
            job.emit(LiveReconfiguring, attempt=self.attempt, generation=self.target, ranks=[],
                     master_port=job._master_port or 0, reason=self._reason,
                     restart=job._restarts_used, max_restarts=job.spec.max_restarts)
        self._changed.set()

    def _recovered(self) -> None:
        steps = {step for step, _ in self._joined.values()}
        sources = {source for _, source in self._joined.values()}
        step, source = max(steps), min(sources)
        if len(steps) != 1 or len(sources) != 1:
            # Cannot happen if the ranks agree in the new group; if it does, never train on.
            self._fall_back(f"ranks rejoined with different states (steps {sorted(steps)}, sources {sorted(sources)})")
            return
        seconds = trio.current_time() - self._began
        assert self.target is not None
        self.generation, self.target = self.target, None
        log.info("job=%s attempt=%d: live recovery to generation %d done in %.2fs: every rank has rank %d's state "
                 "after step %d", self.job.job_id, self.attempt, self.generation, seconds, source, step)
        self.job.emit(LiveRecovered, attempt=self.attempt, generation=self.generation, source=source, step=step,
                      seconds=round(seconds, 6), ranks=sorted(self._replaced))
        self._changed.set()

    def _fall_back(self, reason: str) -> None:
        if not self.failed:
            self.failed = True
            log.warning("job=%s attempt=%d: live recovery not possible, restarting the group: %s",
                        self.job.job_id, self.attempt, reason)
            self.job.emit(LiveFallback, attempt=self.attempt, generation=self.target or self.generation, reason=reason)
            self._changed.set()
            self._fallback_cb(reason)
        return None
