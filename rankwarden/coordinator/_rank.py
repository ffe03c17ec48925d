"""One incarnation of one rank: spawn it, watch it, end it.

Failure detection is two racing tasks and nothing else:

* the exit watcher awaits the launcher's ``wait()`` (a pidfd on Linux, so a
  ``kill -9`` is seen at once);
* the deadline watcher sleeps in a cancel scope whose deadline is the earliest
  of the rank's liveness deadlines. Nothing polls: if the scope expires, the
  deadline that expired is the cause.

A heartbeat only records when it came (``_last_heartbeat``); it does not move
the scope. Moving a Trio deadline is a heap operation, and at 10 Hz times
thousands of ranks it was 6% of the coordinator's CPU. A heartbeat can only
make the rank's next deadline later, so the scope keeps the old, earlier one;
when it fires, the watcher recomputes the deadline from what was last seen and
re-arms (at most once per heartbeat_timeout for a healthy rank). A silent rank
is still failed at exactly its last heartbeat + heartbeat_timeout, because the
re-armed deadline is that time. Anything that can make a deadline *earlier*
(a dropped connection, a goodbye, a busy check) moves the scope at once.

Liveness deadlines, in the order a rank meets them:

    spawned, no hello yet         spawn + startup_timeout            startup_timeout
    connected                     last heartbeat + heartbeat_timeout heartbeat_timeout
    connected, has reported steps last new step + progress_timeout   progress_timeout
    connection dropped uncleanly  drop + CONNECTION_LOST_GRACE       connection_lost
    said goodbye                  goodbye + heartbeat_timeout        (killed; exit code from goodbye)
    silent but busy (see below)   last check + busy window           heartbeat_timeout (re-judged)
                                  last heartbeat + progress_timeout  progress_timeout

A busy rank is not a frozen one. The heartbeat is a Python thread, so one
long C call that holds the GIL (``json.load`` of a huge file, ``pickle.load``)
silences it although the rank is working. So when the heartbeat deadline of
a rank whose process ``ReportsCpu`` (a local one) fires, the process is
sampled before it is called frozen, against the sample taken at its last
heartbeat (or the last check):

* stopped (``T``/``t``: SIGSTOP, a tracer): frozen, at the timeout exactly;
* CPU time grew by at least ``BUSY_CPU_SHARE`` of the elapsed time: busy.
  It is re-judged every heartbeat interval (a window of no less than
  ``BUSY_WINDOW_MIN`` and no more than heartbeat_timeout), so a rank
  SIGSTOPped or deadlocked while busy is caught one window later. Without a
  heartbeat it is never given more than ``progress_timeout`` (when set):
  then it is hung;
* anything else (asleep, D-state, a trickle of CPU from background
  threads): frozen.

A pod does not report CPU: for it the timeout alone decides, as before.

A rank behind a relay (``_aggregate``: a node agent batches its ranks'
liveness) has no heartbeat deadline here: the relay applies it on its node
and names a silent rank (``on_silent``), and the coordinator keeps one
deadline per relay connection. Its other deadlines are as above.

The grace after an unclean drop exists because a killed process closes its
socket a moment before the kernel reports its exit; within the grace the exit
wins and the record says "killed by SIGKILL" rather than "connection lost".
"""

from __future__ import annotations

import collections
import logging
import math
from typing import TYPE_CHECKING

import msgspec
import trio

from rankwarden import protocol
from rankwarden.errors import LaunchError
from rankwarden.events import (
    Failure,
    FailureCause,
    RankBusy,
    RankConnected,
    RankExited,
    RankFailed,
    RankSnapshot,
    RankStarted,
    RankState,
    RankStopped,
)
from rankwarden.launcher import CpuSample, ExitStatus, RankProcess, ReportsCpu, WarmAware
from rankwarden.launcher._agent import NODE_LOST

if TYPE_CHECKING:  # pragma: no cover
    from rankwarden.coordinator._heartbeat import Peer
    from rankwarden.coordinator._host import RankHost

__all__ = ["BUSY_CPU_SHARE", "RankOutcome", "RankRunner", "CONNECTION_LOST_GRACE"]

log = logging.getLogger(__name__)

CONNECTION_LOST_GRACE = 1.0
_RATE_WINDOW = 30.0  # seconds of (time, step) samples kept for steps/s
#: At most one (time, step) sample per this many seconds (the newest is kept
#: up to date): the window is ~30 entries a rank, not one per step report
#: (at 10 Hz and 10,000 ranks that was 3 million tuples).
_RATE_RESOLUTION = 1.0
#: A silent rank is busy if it used at least this share of one CPU since the
#: last sample: a GIL-holding call uses a whole one (less on a crowded host);
#: a deadlocked rank's background threads (NCCL's watchdog) use next to none.
BUSY_CPU_SHARE = 0.15  # a busy rank on an overloaded 2-core host still gets more; a waiting one ~0.07
#: A busy rank is re-judged every heartbeat interval, but over no less than
#: this: CPU time is counted in 10 ms ticks, and on a crowded host a rank gets
#: a fraction of a CPU in bursts, so a shorter window misjudges a busy rank.
BUSY_WINDOW_MIN = 1.0


class RankOutcome(msgspec.Struct, frozen=True):
    state: RankState  # SUCCEEDED, FAILED or STOPPED
    failure: Failure | None = None


class RankRunner:
    """Runs one rank once. Created per (rank, attempt); never reused."""

    def __init__(
        self,
        job: "RankHost",
        rank: int,
        attempt: int,
        adopted: RankProcess | None = None,
        resume: protocol.Resume | None = None,
        live_generation: int = 0,
    ) -> None:
        self.job = job
        #: A rank that was already running when this coordinator started (a pod
        #: left by the previous coordinator): it is watched, not launched.
        self._adopted = adopted
        self.rank = rank
        self.attempt = attempt
        self.state = RankState.PENDING
        self.process: RankProcess | None = None
        self.peer: "Peer | None" = None
        self._acked_at = -math.inf
        self._ack_every = job.spec.heartbeat_timeout / 4
        self.welcome = protocol.Welcome(
            version=protocol.PROTOCOL_VERSION,
            heartbeat_interval=job.spec.effective_heartbeat_interval,
            attempt=attempt,
            resume=resume,
            live_generation=live_generation,
            acks=True,
        )
        self.step: int | None = None
        self.samples: int | None = None
        self.metrics: dict[str, float] = {}
        self.exit_code: int | None = None
        self._spawned_at = math.inf
        self._hello_at: float | None = None
        self._last_heartbeat: float | None = None
        self._last_progress: float | None = None
        self._lost_at: float | None = None
        self._goodbye: protocol.Goodbye | None = None
        self._goodbye_at = math.inf
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._deadline_scope: trio.CancelScope | None = None
        self._run_scope: trio.CancelScope | None = None
        #: Attached through a relay: the relay watches this rank's heartbeats.
        self._relayed = False
        #: (time, sample) at the last heartbeat or the last busy check.
        self._cpu_mark: tuple[float, CpuSample] | None = None
        self._cpu_at_heartbeat: float | None = None
        #: While a silent rank is judged busy: when it is judged again.
        self._busy_check_at: float | None = None
        self._busy_reported = False
        self._silence = ""  # what the last check found, for the failure message
        self._outcome: RankOutcome | None = None
        self._disconnected = trio.Event()
        #: Lowered to 0 by a forced stop: then teardown goes straight to SIGKILL.
        self.kill_grace = job.spec.kill_grace
        #: Live mode: the process group generation this rank announced it trains in.
        self.live_generation: int | None = None
        #: Live mode: while the rank waits at its step boundary for a new
        #: process group, its step cannot advance; heartbeats still must.
        self._progress_paused = False

    # -- the incarnation -------------------------------------------------------

    async def run(self) -> RankOutcome:
        job = self.job
        self.state = RankState.STARTING
        if self._adopted is not None:
            self.process = self._adopted
        else:
            try:
                self.process = await job.launcher.start(job.build_request(self.rank, self.attempt))
            except LaunchError as exc:
                return self._fail(FailureCause.LAUNCH_FAILED, str(exc))
        self._spawned_at = trio.current_time()
        warm = isinstance(self.process, WarmAware) and self.process.warm
        job.emit(RankStarted, attempt=self.attempt, rank=self.rank, pid=self.process.pid, warm=warm)
        try:
            async with trio.open_nursery() as nursery:
                self._run_scope = nursery.cancel_scope
                nursery.start_soon(self._watch_exit, nursery.cancel_scope)
                nursery.start_soon(self._watch_deadlines, nursery.cancel_scope)
        finally:
            with trio.CancelScope(shield=True):
                status = await self.process.stop(self.kill_grace)
                if self.peer is not None:
                    self.peer.close()
                if self._outcome is None:  # torn down from outside (group restart, stop)
                    self._record_stopped(status)
        assert self._outcome is not None
        return self._outcome

    async def _watch_exit(self, done: trio.CancelScope) -> None:
        assert self.process is not None
        status = await self.process.wait()
        self.exit_code = status.code
        if self.peer is not None:
            # The process is gone but what it sent last (a CheckpointReady of
            # its final save, its Goodbye) may still be unread in the socket:
            # read the connection to its end, briefly, before judging the exit.
            with trio.move_on_after(CONNECTION_LOST_GRACE):
                await self._disconnected.wait()
        if self._outcome is None:
            self._on_exit(status)
        done.cancel()

    def _on_exit(self, status: ExitStatus) -> None:
        if self.job.stopping:
            self._record_stopped(status)
        elif status.ok:
            self._succeed()
        elif status.reason == NODE_LOST:
            # The message names the node, its host and why (AgentLauncher).
            self._fail(FailureCause.NODE_LOST, f"rank {self.rank}: {status.message}", status=status)
        else:
            if not status.started:
                cause = FailureCause.LAUNCH_FAILED
            elif status.signal is not None:
                cause = FailureCause.SIGNALED
            else:
                cause = FailureCause.EXITED
            self._fail(cause, f"rank {self.rank} {status.describe()}", status=status)

    async def _watch_deadlines(self, done: trio.CancelScope) -> None:
        while True:
            deadline, _ = self._next_deadline()
            with trio.CancelScope(deadline=deadline) as scope:
                self._deadline_scope = scope
                await trio.sleep_forever()
            self._deadline_scope = None
            now = trio.current_time()
            deadline, cause = self._next_deadline()
            if now >= deadline and self._outcome is None:
                if cause == FailureCause.HEARTBEAT_TIMEOUT and self._still_busy(now):
                    continue
                self._deadline_expired(cause, now)
                done.cancel()
                return

    def _next_deadline(self) -> tuple[float, str]:
        spec = self.job.spec
        if self._goodbye is not None:
            return self._goodbye_at + spec.heartbeat_timeout, "exit_timeout"
        if self._lost_at is not None:
            return self._lost_at + CONNECTION_LOST_GRACE, FailureCause.CONNECTION_LOST
        if self._hello_at is None:
            if spec.effective_startup_timeout:
                return self._spawned_at + spec.effective_startup_timeout, FailureCause.STARTUP_TIMEOUT
            return math.inf, ""
        assert self._last_heartbeat is not None
        if self._relayed:
            best = (math.inf, FailureCause.HEARTBEAT_TIMEOUT)  # the relay's deadline, not ours
        else:
            best = (self._last_heartbeat + spec.heartbeat_timeout, FailureCause.HEARTBEAT_TIMEOUT)
        if self._busy_check_at is not None:
            best = (self._busy_check_at, FailureCause.HEARTBEAT_TIMEOUT)
        if spec.progress_timeout and not self._progress_paused:
            since = self._last_progress
            if self._busy_check_at is not None and since is None:
                since = self._last_heartbeat  # busy before its first step: bounded all the same
            if since is not None and since + spec.progress_timeout <= best[0]:
                best = (since + spec.progress_timeout, FailureCause.PROGRESS_TIMEOUT)
        return best

    def _sample(self) -> CpuSample | None:
        return self.process.sample() if isinstance(self.process, ReportsCpu) else None

    def _mark_cpu(self, now: float) -> None:
        sample = self._sample()
        self._cpu_mark = None if sample is None else (now, sample)
        self._cpu_at_heartbeat = None if sample is None else sample.cpu_seconds

    def _still_busy(self, now: float) -> bool:
        """The heartbeat deadline fired: is the rank busy (keep watching) or frozen?"""
        sample, mark = self._sample(), self._cpu_mark
        self._cpu_mark = None if sample is None else (now, sample)
        if sample is None or mark is None:
            return False  # a pod, or a process that is gone: the timeout decides
        silent_for = now - (self._last_heartbeat or now)
        if sample.stopped:
            self._silence = f"its process is stopped (state {sample.state}: SIGSTOP or a tracer)"
            return False
        used = sample.cpu_seconds - mark[1].cpu_seconds
        if now <= mark[0] or used < BUSY_CPU_SHARE * (now - mark[0]):
            if self._busy_check_at is not None:
                self._silence = (f"it was busy, but in the {now - mark[0]:.1f}s since the last check "
                                 f"it used {used:.2f}s of CPU")
            else:
                self._silence = f"it used {used:.2f}s of CPU in {now - mark[0]:.1f}s (state {sample.state})"
            return False
        total = sample.cpu_seconds - (self._cpu_at_heartbeat or 0.0)
        spec = self.job.spec
        self._busy_check_at = now + min(spec.heartbeat_timeout, max(BUSY_WINDOW_MIN, spec.effective_heartbeat_interval))
        message = (
            f"rank {self.rank} sent no heartbeat for {silent_for:.1f}s but is running (+{total:.1f}s CPU): "
            "busy in a call that holds the GIL; still watching"
        )
        if not self._busy_reported:
            self._busy_reported = True
            log.warning("job=%s attempt=%d rank=%d: %s", self.job.job_id, self.attempt, self.rank, message)
            self.job.emit(RankBusy, attempt=self.attempt, rank=self.rank, silent_for=round(silent_for, 6),
                          cpu_seconds=round(total, 6), message=message)
        else:
            log.debug("job=%s attempt=%d rank=%d: %s", self.job.job_id, self.attempt, self.rank, message)
        return True

    def _reschedule(self) -> None:
        # Only ever earlier: a later deadline is picked up when the old one fires
        # (see the module docstring).
        scope = self._deadline_scope
        if scope is not None:
            deadline = self._next_deadline()[0]
            if deadline < scope.deadline:
                scope.deadline = deadline

    def _deadline_expired(self, cause: str, now: float) -> None:
        spec = self.job.spec
        if cause == "exit_timeout":
            assert self._goodbye is not None
            code = self._goodbye.exit_code
            note = f"did not exit within {spec.heartbeat_timeout:g}s of finishing; killed"
            if code == 0:
                self._succeed(note)
            else:
                self._fail(FailureCause.EXITED, f"rank {self.rank} exited with code {code} ({note})")
            return
        if cause == FailureCause.STARTUP_TIMEOUT:
            since = self._spawned_at
            msg = f"rank {self.rank} did not say hello within {spec.effective_startup_timeout:g}s of starting (startup_timeout)"
        elif cause == FailureCause.HEARTBEAT_TIMEOUT:
            since = self._last_heartbeat or now
            why = f"{self._silence}: it is frozen" if self._silence else "it is frozen or its host is gone"
            msg = (
                f"rank {self.rank} stopped sending heartbeats {now - since:.1f}s ago "
                f"(heartbeat_timeout={spec.heartbeat_timeout:g}); {why}"
            )
        elif cause == FailureCause.PROGRESS_TIMEOUT and self._busy_check_at is not None:
            since = now - spec.progress_timeout
            msg = (
                f"rank {self.rank} has sent no heartbeat for {now - (self._last_heartbeat or now):.1f}s, "
                f"busy in a call that holds the GIL, and made no progress for {spec.progress_timeout:g}s "
                f"(progress_timeout={spec.progress_timeout:g}); it is hung"
            )
        elif cause == FailureCause.PROGRESS_TIMEOUT:
            since = self._last_progress or now
            msg = (
                f"rank {self.rank} is alive but has not advanced past step {self.step} "
                f"for {now - since:.1f}s (progress_timeout={spec.progress_timeout:g}); it is hung"
            )
        else:
            since = self._lost_at or now
            msg = f"rank {self.rank} dropped its heartbeat connection but did not exit"
        self._fail(FailureCause(cause), msg, detected_after=now - since)

    # -- outcomes ---------------------------------------------------------------

    def _succeed(self, note: str = "") -> None:
        self.state = RankState.SUCCEEDED
        self._outcome = RankOutcome(RankState.SUCCEEDED)
        self.job.emit(RankExited, attempt=self.attempt, rank=self.rank, exit_code=0, note=note)

    def _fail(
        self, cause: FailureCause, message: str, *, status: ExitStatus | None = None, detected_after: float = 0.0
    ) -> RankOutcome:
        failure = Failure(
            rank=self.rank,
            attempt=self.attempt,
            cause=cause,
            message=message,
            exit_code=status.code if status else None,
            signal=status.signal if status else None,
            reason=status.reason if status else None,
            detected_at=self.job.wall_time(),
            detected_after=round(detected_after, 6),
        )
        self.state = RankState.FAILED
        self._outcome = RankOutcome(RankState.FAILED, failure)
        if self.job.spec.live:
            # Its peers are blocked in a collective with it: their recovery starts
            # when its sockets close, so no grace (SIGKILL also ends a SIGSTOPped rank).
            self.kill_grace = 0.0
        log.warning("job=%s attempt=%d rank=%d: %s", self.job.job_id, self.attempt, self.rank, message)
        self.job.record_failure(failure)
        self.job.emit(RankFailed, attempt=self.attempt, rank=self.rank, failure=failure)
        return self._outcome

    def _record_stopped(self, status: ExitStatus) -> None:
        self.state = RankState.STOPPED
        self._outcome = RankOutcome(RankState.STOPPED)
        self.job.emit(
            RankStopped, attempt=self.attempt, rank=self.rank, exit_code=status.code, signal=status.signal
        )

    # -- called by the heartbeat server ---------------------------------------------

    def attach(self, peer: "Peer", hello: protocol.Hello) -> None:
        now = trio.current_time()
        self.peer = peer
        self._relayed = peer.covers_liveness
        self._hello_at = self._last_heartbeat = now
        self._acked_at = -math.inf
        self._mark_cpu(now)
        if self.state == RankState.STARTING:
            self.state = RankState.RUNNING
        self.job.emit(RankConnected, attempt=self.attempt, rank=self.rank, pid=hello.pid, host=hello.host)
        self._reschedule()

    def on_message(self, message) -> None:
        now = trio.current_time()
        if isinstance(message, protocol.Heartbeat):
            self._last_heartbeat = now
            # Answered, so that a rank cut off by a partition (TCP goes silent,
            # it does not close) sees its heartbeats unanswered and stops itself.
            # At most four answers per heartbeat_timeout: an ack covers every
            # earlier heartbeat, so the rank's oldest unanswered one is never
            # older than a quarter of its deadline plus an interval, and the
            # coordinator does not send one frame per heartbeat received.
            if now - self._acked_at >= self._ack_every:
                self._acked_at = now
                self.send(protocol.HeartbeatAck(seq=message.seq))
            if self._busy_check_at is not None:
                log.info("job=%s attempt=%d rank=%d: heartbeats again after a busy spell",
                         self.job.job_id, self.attempt, self.rank)
            self._busy_check_at = None
            self._silence = ""
            self._mark_cpu(now)
            self._progress(now, message.step, message.samples, message.metrics or None)
            return  # a heartbeat never makes a deadline earlier: nothing to reschedule
        elif isinstance(message, protocol.Goodbye):
            self._goodbye = message
            self._goodbye_at = now
        elif isinstance(message, protocol.CheckpointReady):
            self.job.checkpoint_ready(self, message)
        elif isinstance(message, protocol.CheckpointFailed):
            self.job.checkpoint_failed(self, message)
        elif isinstance(message, (protocol.LiveReady, protocol.LiveJoined)):
            self.job.live_message(self, message)
        self._reschedule()

    def pause_progress(self) -> None:
        """Live mode: the rank waits at its step boundary; only heartbeats are watched."""
        self._progress_paused = True
        self._reschedule()

    def resume_progress(self) -> None:
        """Live mode: the rank trains again; its progress deadline restarts now."""
        self._progress_paused = False
        self._last_progress = trio.current_time()
        self._reschedule()

    def _progress(self, now: float, step: int | None, samples: int | None, metrics: dict[str, float] | None) -> None:
        if step is not None and (self.step is None or step > self.step):
            self.step = step
            self._last_progress = now
            rate = self._rate
            if len(rate) >= 2 and now - rate[-2][0] < _RATE_RESOLUTION:
                rate[-1] = (now, step)
            else:
                rate.append((now, step))
                while now - rate[0][0] > _RATE_WINDOW:
                    rate.popleft()
        if samples is not None:
            self.samples = samples
        if metrics is not None:
            self.metrics = dict(metrics)

    def on_progress(self, step: int | None, samples: int | None, metrics: dict[str, float] | None) -> None:
        """From a relay's beat: only what changed (never moves a deadline earlier)."""
        self._progress(trio.current_time(), step, samples, metrics)

    def on_busy(self, silent_for: float, cpu_seconds: float, seen_by: str) -> None:
        """The relay found this rank silent but burning CPU: busy, still watched (by the relay)."""
        if self._outcome is not None:
            return
        message = (f"rank {self.rank} sent no heartbeat for {silent_for:.1f}s but is running "
                   f"(+{cpu_seconds:.1f}s CPU, seen by {seen_by}): busy in a call that holds the GIL; still watching")
        log.warning("job=%s attempt=%d rank=%d: %s", self.job.job_id, self.attempt, self.rank, message)
        self.job.emit(RankBusy, attempt=self.attempt, rank=self.rank, silent_for=round(silent_for, 6),
                      cpu_seconds=round(cpu_seconds, 6), message=message)

    def on_silent(self, silent_for: float, why: str) -> None:
        """The relay found this rank silent (or the relay itself went silent): it is frozen."""
        if self._outcome is not None:
            return
        spec = self.job.spec
        self._fail(
            FailureCause.HEARTBEAT_TIMEOUT,
            f"rank {self.rank} stopped sending heartbeats {silent_for:.1f}s ago "
            f"(heartbeat_timeout={spec.heartbeat_timeout:g}); {why}",
            detected_after=silent_for,
        )
        if self._run_scope is not None:
            self._run_scope.cancel()

    def on_disconnect(self, peer: "Peer", clean: bool) -> None:
        if peer is not self.peer:
            return
        self.peer = None
        self._disconnected.set()
        if not clean and self._outcome is None:
            self._lost_at = trio.current_time()
            self._reschedule()

    def send(self, message) -> None:
        if self.peer is not None:
            self.peer.send(message)

    # -- views ---------------------------------------------------------------------

    def snapshot(self) -> RankSnapshot:
        now = trio.current_time()
        rate = None
        if len(self._rate) >= 2:
            (t0, s0), (t1, s1) = self._rate[0], self._rate[-1]
            if t1 > t0:
                rate = (s1 - s0) / (t1 - t0)
        age = None
        if self._last_heartbeat is not None and self._outcome is None:
            last = self._last_heartbeat
            if self._relayed and self.peer is not None:
                last = self.peer.last_seen  # type: ignore[attr-defined]
            age = max(0.0, now - last)
        return RankSnapshot(
            rank=self.rank,
            attempt=self.attempt,
            state=self.state,
            pid=self.process.pid if self.process else None,
            step=self.step,
            samples=self.samples,
            heartbeat_age=age,
            steps_per_second=rate,
            exit_code=self.exit_code,
            metrics=dict(self.metrics),
        )
