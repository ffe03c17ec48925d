"""The restart policy: what happens when a rank fails, for one job.

Scope ``group``: an attempt is all ranks together. The first rank that fails
cancels the attempt, every other rank is stopped (in parallel, SIGTERM ->
kill_grace -> SIGKILL), and if budget is left the whole group relaunches
after the backoff with a fresh MASTER_PORT. In live mode (``JobSpec.live``) a failed rank of a group
attempt is replaced while the others keep running (``_live.LiveSession``);
only when that cannot proceed does the group restart. Scope ``rank``: each rank loops
on its own and only a failed rank relaunches. Both draw on one budget of
``max_restarts``; restart ``n`` waits ``backoff.delay(n)``. The job fails when
a failure finds the budget spent, and its report leads with the first failure
observed in the whole job. Before each group attempt a launcher that sizes
attempts (``SizesAttempts``: elastic node counts) says how many ranks it has,
waiting for enough nodes; the resume step is then chosen for that world size.

The policy decides; the ``Coordinator`` owns the job's state (attempt number,
budget used, the current runners, MASTER_PORT) and the heartbeat server, so
the policy reads and writes that state through the coordinator it serves.
"""

from __future__ import annotations

import enum
import logging
import signal
from typing import TYPE_CHECKING, Callable

import trio

from rankwarden import protocol
from rankwarden.coordinator._failfast import TAIL_LINES, EarlyFailure, configuration_error, early_failure, may_be_early
from rankwarden.coordinator._live import LiveSession
from rankwarden.coordinator._rank import RankRunner
from rankwarden.coordinator._request import free_port
from rankwarden.errors import CheckpointRefused, LaunchError
from rankwarden.events import AttemptStarted, Failure, JobState, RankState, Restarting
from rankwarden.launcher import RankProcess, SizesAttempts
from rankwarden.spec import RestartScope

if TYPE_CHECKING:  # pragma: no cover
    from rankwarden.coordinator._job import Coordinator

__all__ = ["RestartPolicy"]

log = logging.getLogger("rankwarden.coordinator._job")  # the job's log, as before the move


class _Refused(Exception):
    """No attempt can start: the checkpoint to resume is not this job's (the reason is in ``_fatal``)."""


class _Grant(enum.Enum):
    GRANTED = "granted"
    EXHAUSTED = "exhausted"
    STOPPED = "stopped"


class RestartPolicy:
    """Runs a job's attempts until it succeeds, fails or is stopped (``run``)."""

    def __init__(self, job: "Coordinator") -> None:
        self.job = job

    async def run(self) -> JobState:
        if self.job.spec.restart_scope == RestartScope.GROUP:
            return await self._run_group()
        return await self._run_rank_scope()

    async def _run_group(self) -> JobState:
        adopted = await self._take_adopted_group()
        while True:
            self.job._attempt += 1
            try:
                result = await self._run_group_attempt(self.job._attempt, adopted)
            except _Refused:
                return JobState.STOPPED if self.job.stopping else JobState.FAILED
            adopted = {}
            if self.job.stopping:
                return JobState.STOPPED
            if result == RankState.SUCCEEDED:
                return JobState.SUCCEEDED
            attempt = self.job._attempt
            if self._repeats_early_failure(None, attempt, [f for f in self.job._failures if f.attempt == attempt]):
                return JobState.FAILED
            grant = await self._grant_restart(rank=None)
            if grant == _Grant.EXHAUSTED:
                return JobState.FAILED
            if grant == _Grant.STOPPED:
                return JobState.STOPPED

    async def _take_adopted_group(self) -> dict[int, RankProcess]:
        """The ranks to adopt in scope ``group``: all of one attempt, or none.

        A partial group cannot be resumed (its process group is broken), so
        its survivors are stopped and the job goes on with the next attempt
        number, which keeps the new ranks' names apart from the old ones."""
        if not self.job._adopted:
            return {}
        attempts = {attempt for attempt, _ in self.job._adopted.values()}
        attempt = max(attempts)
        if len(attempts) == 1 and len(self.job._adopted) == self.job.spec.world_size:
            log.info("job=%s: adopting the %d running ranks of attempt %d", self.job.job_id, len(self.job._adopted), attempt)
            self.job._attempt = attempt - 1
            return {rank: process for rank, (_, process) in self.job._adopted.items()}
        log.warning(
            "job=%s: found %d of %d ranks still running (attempts %s); stopping them and starting attempt %d",
            self.job.job_id, len(self.job._adopted), self.job.spec.world_size, sorted(attempts), attempt + 1,
        )
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                for _, process in self.job._adopted.values():
                    nursery.start_soon(process.stop, self.job.spec.kill_grace)
        if self.job._committer is not None:
            await self.job._committer.new_attempt(self.job._checkpoint_tag(attempt + 1))
        self.job._attempt = attempt
        return {}

    async def _run_group_attempt(self, attempt: int, adopted: dict[int, RankProcess] | None = None) -> RankState:
        adopted = adopted or {}
        if not adopted:
            await self._size_attempt(attempt)
        if self.job._committer is not None and attempt > 1 and not adopted:
            await self.job._committer.new_attempt(self.job._checkpoint_tag(attempt))
        resume = await self._plan_resume(attempt)
        if self.job._placement is not None:
            self.job._master_port = self.job._placement.master_port  # each pod has a network of its own
        elif self.job._first_master_port:
            self.job._master_port, self.job._first_master_port = self.job._first_master_port, None
        else:
            self.job._master_port = free_port(self.job.spec.master_addr, exclude=self.job._master_port)
        runners = [RankRunner(self.job, rank, attempt, adopted.get(rank), resume)
                   for rank in range(self.job.world_size)]
        self.job._runners = {runner.rank: runner for runner in runners}
        if not self.job.stopping:
            self.job._state = JobState.RUNNING
        self.job.emit(AttemptStarted, attempt=attempt, master_port=self.job._master_port, adopted=bool(adopted),
                      world_size=len(runners))
        log.info("job=%s attempt=%d: %s %d ranks (MASTER_PORT=%d)", self.job.job_id, attempt,
                 "adopting" if adopted else "starting", len(runners), self.job._master_port)
        failed = False
        remaining = len(runners)
        async with trio.open_nursery() as nursery:

            def fall_back(reason: str) -> None:
                nonlocal failed
                failed = True
                nursery.cancel_scope.cancel()

            live = LiveSession(self.job, attempt, fall_back) if self.job.spec.live else None
            self.job._live = live

            async def run_one(runner: RankRunner) -> None:
                nonlocal failed, remaining
                outcome = await runner.run()
                if outcome.state == RankState.FAILED and live is not None and not failed and not self.job.stopping:
                    # Live mode: the failed rank is gone (killed, reaped); a
                    # replacement joins the survivors, who keep training.
                    replacement = live.replace(runner)
                    if replacement is not None:
                        nursery.start_soon(run_one, replacement)
                        return
                remaining -= 1
                if outcome.state == RankState.FAILED:
                    failed = True
                if failed or remaining == 0:
                    nursery.cancel_scope.cancel()  # group teardown, or everyone is done

            for runner in runners:
                nursery.start_soon(run_one, runner)
            if live is not None:
                nursery.start_soon(live.watch)
            nursery.start_soon(self._stop_on_request, lambda: list(self.job._runners.values()), nursery.cancel_scope)
        self.job._live = None
        return RankState.FAILED if failed else RankState.SUCCEEDED

    async def _run_rank_scope(self) -> JobState:
        exhausted = False
        remaining = self.job.spec.world_size
        self.job._attempt = self.job._attempts_before + 1
        async with trio.open_nursery() as nursery:

            async def rank_loop(rank: int) -> None:
                nonlocal exhausted, remaining
                attempt, adopted = self.job._adopted.get(rank, (self.job._attempts_before + 1, None))
                attempt -= 1
                while True:
                    attempt += 1
                    try:
                        resume = None if adopted is not None else await self._plan_resume(attempt, rank)
                    except _Refused:
                        exhausted = True
                        nursery.cancel_scope.cancel()
                        return
                    runner = RankRunner(self.job, rank, attempt, adopted, resume)
                    adopted = None
                    self.job._runners[rank] = runner
                    self.job._attempt = max(self.job._attempt, attempt)
                    outcome = await runner.run()
                    if outcome.state != RankState.FAILED or self.job.stopping:
                        break
                    if self._repeats_early_failure(rank, attempt, [outcome.failure] if outcome.failure else []):
                        exhausted = True
                        nursery.cancel_scope.cancel()
                        return
                    grant = await self._grant_restart(rank=rank)
                    if grant != _Grant.GRANTED:
                        exhausted = grant == _Grant.EXHAUSTED
                        nursery.cancel_scope.cancel()
                        return
                remaining -= 1
                if remaining == 0:
                    nursery.cancel_scope.cancel()

            for rank in range(self.job.spec.world_size):
                nursery.start_soon(rank_loop, rank)
            nursery.start_soon(self._stop_on_request, lambda: list(self.job._runners.values()), nursery.cancel_scope)
        if self.job.stopping:
            return JobState.STOPPED
        return JobState.FAILED if exhausted else JobState.SUCCEEDED

    async def _size_attempt(self, attempt: int) -> None:
        """Elastic node counts: the launcher decides how many ranks this attempt has
        (it waits for enough nodes). Raises _Refused when it cannot, or when the
        job is stopped while it waits."""
        launcher = self.job.launcher
        if not isinstance(launcher, SizesAttempts):
            return
        world, error = 0, None
        with trio.CancelScope() as scope:

            async def cancel_on_stop() -> None:
                await self.job._stop_requested.wait()
                scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(cancel_on_stop)
                try:
                    world = await launcher.size_attempt(self.job.job_id, attempt)
                except LaunchError as exc:
                    error = str(exc)  # raised below, outside the nursery (no exception group)
                nursery.cancel_scope.cancel()
        if scope.cancelled_caught:
            raise _Refused(self.job._stop_reason)
        if error is None and not 1 <= world <= self.job.spec.world_size:
            error = f"the launcher sized attempt {attempt} at {world} ranks; the job has 1 to {self.job.spec.world_size}"
        if error is not None:
            self.job._fatal = error
            log.error("job=%s attempt=%d: %s", self.job.job_id, attempt, error)
            raise _Refused(error)
        if world != self.job._world_size:
            log.warning("job=%s attempt=%d: world size %d -> %d", self.job.job_id, attempt, self.job._world_size, world)
        self.job._world_size = world

    async def _plan_resume(self, attempt: int, rank: int | None = None) -> protocol.Resume | None:
        """The step the ranks about to start load (told in their Welcome), or None
        without a checkpoint store. Raises _Refused when no attempt may start."""
        if self.job._committer is None:
            return None
        try:
            plan = await self.job._committer.plan_resume(attempt, rank)
        except CheckpointRefused as exc:
            self.job._fatal = str(exc)
        except OSError as exc:
            self.job._fatal = f"cannot read checkpoint store {self.job.spec.checkpoint_url!r} to choose the resume step: {exc}"
        else:
            return protocol.Resume(step=plan.step)
        log.error("job=%s: %s", self.job.job_id, self.job._fatal)
        raise _Refused(self.job._fatal)

    def _repeats_early_failure(self, rank: int | None, attempt: int, failures: list[Failure]) -> bool:
        """A failure before the first step, the same as the previous attempt's: a
        configuration error (see _failfast); records it as the job's fatal reason.

        ``failures`` are this attempt's (scope ``group``) or this rank's one
        failure (scope ``rank``): never a scan of the job's whole history, which
        made a burst of N failures cost O(N^2). A rank's stderr is read only
        for a failure that can be an early one (an exit before any step), never
        for a frozen, hung, killed or lost rank: a node that freezes fails its
        ranks without touching a file. The read that remains is at most 16 KiB
        of a file just written (page cache), and it decides whether to restart
        at all, so it stays here rather than in a thread: a thread would make
        the restart's timing depend on the thread's (and MockClock jump ahead
        while it runs)."""
        current: dict[EarlyFailure, int] = {}
        for failure in failures:
            runner = self.job._runners.get(failure.rank)
            step = runner.snapshot().step if runner is not None else None
            if not may_be_early(failure, step):
                continue
            tail = self.job.job_dir.stderr_tail(failure.rank, attempt, TAIL_LINES)
            if (early := early_failure(failure, step, tail)) is not None:
                current.setdefault(early, failure.rank)
        previous = self.job._early_failures.get(rank, {})
        self.job._early_failures[rank] = current
        message = configuration_error(previous, current, attempt, self.job.spec.max_restarts - self.job._restarts_used)
        if message:
            self.job._fatal = message
        return bool(message)

    async def _grant_restart(self, rank: int | None) -> _Grant:
        if self.job._restarts_used >= self.job.spec.max_restarts:
            return _Grant.EXHAUSTED
        self.job._restarts_used += 1
        delay = self.job.spec.backoff.delay(self.job._restarts_used, self.job._rng.random())
        if rank is None:
            self.job._state = JobState.RESTARTING
        self.job.emit(
            Restarting,
            attempt=self.job._attempt,
            rank=rank,
            restart=self.job._restarts_used,
            max_restarts=self.job.spec.max_restarts,
            delay=delay,
            scope=self.job.spec.restart_scope.value,
        )
        log.info(
            "job=%s: restart %d of %d in %.2fs%s", self.job.job_id, self.job._restarts_used,
            self.job.spec.max_restarts, delay, "" if rank is None else f" (rank {rank})",
        )
        with trio.move_on_after(delay):
            await self.job._stop_requested.wait()
        return _Grant.STOPPED if self.job.stopping else _Grant.GRANTED

    async def _stop_on_request(self, runners: Callable[[], list[RankRunner]], scope: trio.CancelScope) -> None:
        # Graceful stop: a connected rank gets Drain (a drain-aware script
        # checkpoints and exits 0; the worker SIGTERMs any other script at
        # once); a rank that is not connected gets SIGTERM. SIGKILL once
        # stop_grace is over, or at once on a forced stop.
        await self.job._stop_requested.wait()
        for runner in runners():
            if runner.peer is not None:
                runner.send(protocol.Drain(reason=self.job._stop_reason))
            elif runner.process is not None:
                runner.process.signal(signal.SIGTERM)
                runner.process.signal(signal.SIGCONT)
        with trio.move_on_after(self.job.spec.stop_grace):
            await self.job._force_requested.wait()
        for runner in runners():
            runner.kill_grace = 0.0
        scope.cancel()
