"""Lifecycle events, failure records, states and snapshots: what the coordinator tells the world.

Everything here is a frozen msgspec Struct, so an event or snapshot handed to a
subscriber can never change under it, and each one serialises to the JSON
object written to ``events.jsonl`` (the ``type`` field names the event).

Event types (``type``):

=================  ==========================================================
job_started        the coordinator is up; carries the heartbeat address
attempt_started    a group attempt begins (fresh MASTER_PORT)
rank_started       a rank's process was spawned (pid)
rank_connected     the rank said hello on the heartbeat socket
rank_exited        the rank exited 0 (it finished)
rank_failed        the rank failed; ``failure`` says how (see FailureCause)
rank_busy          a silent rank is still using CPU (a call that holds the
                   GIL): not frozen; still watched (once per incarnation)
rank_stopped       the coordinator stopped a rank (teardown or stop)
peer_rejected      a heartbeat peer was dropped (bad frame, wrong token, ...)
checkpoint_committed  every rank wrote ``step``; its manifest is durable
checkpoint_failed  a step could not be written or committed (it never will be)
resume_chosen      the step every rank of the attempt resumes from, and the
                   newer steps skipped with why (None: from scratch)
restarting         a restart was granted; ``delay`` is the backoff
live_reconfiguring live mode: ``ranks`` are being replaced (already killed);
                   the survivors keep their processes; new MASTER_PORT
live_recovered     live mode: every rank trains in process group
                   ``generation``, with rank ``source``'s state after ``step``
live_fallback      live mode: live recovery could not proceed (``reason``);
                   the group restarts from the agreed checkpoint instead
stopping           a graceful stop was requested
job_succeeded      every rank exited 0
job_failed         restart budget spent; ``failures`` leads with the first
job_stopped        the job was stopped on request
=================  ==========================================================
"""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "AttemptStarted",
    "CheckpointCommitted",
    "CheckpointFailedEvent",
    "Event",
    "Failure",
    "FailureCause",
    "JobEnded",
    "JobFailedEvent",
    "JobSnapshot",
    "JobStarted",
    "JobState",
    "JobStopped",
    "JobSucceeded",
    "LiveFallback",
    "LiveReconfiguring",
    "LiveRecovered",
    "PeerRejected",
    "RankBusy",
    "RankConnected",
    "RankExited",
    "RankFailed",
    "RankSnapshot",
    "RankStarted",
    "RankState",
    "RankStopped",
    "Restarting",
    "ResumeChosen",
    "SkippedStepInfo",
    "Stopping",
    "event_to_json",
    "failure_report",
]


class JobState(str, enum.Enum):
    """A job's life: pending -> running <-> restarting -> succeeded | failed | stopped.

    ``stopping`` lies between running and stopped while ranks drain.
    """

    PENDING = "pending"
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.STOPPED)


class RankState(str, enum.Enum):
    """One rank: pending -> starting (spawned) -> running (said hello) -> succeeded | failed | stopped."""

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"


class FailureCause(str, enum.Enum):
    EXITED = "exited"  # exited with a non-zero code
    SIGNALED = "signaled"  # killed by a signal (kill -9, OOM killer, segfault)
    CONNECTION_LOST = "connection_lost"  # heartbeat connection dropped, process still there
    HEARTBEAT_TIMEOUT = "heartbeat_timeout"  # frozen: SIGSTOP, D-state, lost node
    PROGRESS_TIMEOUT = "progress_timeout"  # alive but `step` stopped advancing
    STARTUP_TIMEOUT = "startup_timeout"  # never said hello
    LAUNCH_FAILED = "launch_failed"  # could not be spawned at all
    NODE_LOST = "node_lost"  # its host's agent died, froze or was cut off (multi-node)


class Failure(msgspec.Struct, frozen=True, kw_only=True):
    """One observed failure of one rank in one attempt."""

    rank: int
    attempt: int
    cause: FailureCause
    message: str
    exit_code: int | None = None
    signal: int | None = None
    #: The platform's own word for it, where there is one: Kubernetes' OOMKilled,
    #: Evicted, ImagePullBackOff, Unschedulable...
    reason: str | None = None
    #: Wall-clock time the failure was noticed.
    detected_at: float
    #: Seconds from the best estimate of when it happened (last heartbeat, last
    #: step, spawn) to detection; 0 when the exit itself was observed.
    detected_after: float = 0.0


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    job: str
    time: float
    attempt: int = 0
    rank: int | None = None


class JobStarted(Event, tag="job_started"):
    world_size: int
    entrypoint: str
    job_dir: str
    coordinator: str


class AttemptStarted(Event, tag="attempt_started"):
    master_port: int
    #: The ranks were already running (left by a previous coordinator) and were adopted.
    adopted: bool = False
    #: This attempt's ranks: the spec's world size, or fewer after an elastic job lost nodes (0: not known).
    world_size: int = 0


class RankStarted(Event, tag="rank_started"):
    pid: int | None
    #: Forked from the job's pre-imported zygote (a warm restart), not a fresh interpreter.
    warm: bool = False


class RankConnected(Event, tag="rank_connected"):
    pid: int
    host: str = ""


class RankExited(Event, tag="rank_exited"):
    exit_code: int = 0
    note: str = ""


class RankFailed(Event, tag="rank_failed"):
    failure: Failure


class RankBusy(Event, tag="rank_busy"):
    #: Seconds since its last heartbeat, and CPU seconds it used in them.
    silent_for: float
    cpu_seconds: float
    message: str = ""


class RankStopped(Event, tag="rank_stopped"):
    exit_code: int | None = None
    signal: int | None = None


class PeerRejected(Event, tag="peer_rejected"):
    reason: str
    peer: str = ""


class CheckpointCommitted(Event, tag="checkpoint_committed"):
    step: int
    files: int
    bytes: int
    seconds: float


class CheckpointFailedEvent(Event, tag="checkpoint_failed"):
    step: int
    error: str


class SkippedStepInfo(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    reason: str


class ResumeChosen(Event, tag="resume_chosen"):
    """Every rank of ``attempt`` (or ``rank`` alone, in scope ``rank``) loads ``step``."""

    step: int | None
    skipped: list[SkippedStepInfo] = []
    #: "resuming from step 8 (step 12 skipped: rank 1's file rank_00001.pt failed its checksum)"
    message: str = ""


class Restarting(Event, tag="restarting"):
    restart: int
    max_restarts: int
    delay: float
    scope: str


class LiveReconfiguring(Event, tag="live_reconfiguring"):
    #: The process group generation being formed (the first failure's is 1).
    generation: int
    #: Ranks replaced so far (a survivor-first report starts with none).
    ranks: list[int]
    master_port: int
    reason: str
    restart: int = 0
    max_restarts: int = 0


class LiveRecovered(Event, tag="live_recovered"):
    generation: int
    #: The rank whose state every rank loaded, and the last step it applied:
    #: training resumes at ``step + 1``.
    source: int
    step: int
    #: Seconds from the start of the reconfiguration to the last rank rejoining.
    seconds: float
    ranks: list[int] = []


class LiveFallback(Event, tag="live_fallback"):
    generation: int
    reason: str


class Stopping(Event, tag="stopping"):
    reason: str


class JobSucceeded(Event, tag="job_succeeded"):
    pass


class JobFailedEvent(Event, tag="job_failed"):
    message: str
    failures: list[Failure]


class JobStopped(Event, tag="job_stopped"):
    reason: str


JobEnded = (JobSucceeded, JobFailedEvent, JobStopped)

_json = msgspec.json.Encoder()


def event_to_json(event: Event) -> bytes:
    return _json.encode(event)


class RankSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    rank: int
    attempt: int
    state: RankState
    pid: int | None = None
    step: int | None = None
    samples: int | None = None
    #: Seconds since the last heartbeat; None before the first.
    heartbeat_age: float | None = None
    #: Steps per second over the recent window; None until two steps were seen.
    steps_per_second: float | None = None
    exit_code: int | None = None
    metrics: dict[str, float] = {}


class JobSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    state: JobState
    attempt: int
    restarts_used: int
    max_restarts: int
    world_size: int
    ranks: list[RankSnapshot]
    failures: list[Failure]
    job_dir: str
    coordinator: str = ""
    #: Newest step committed by this job's coordinator (or found at start); None if none.
    checkpoint_step: int | None = None
    started_at: float | None = None
    ended_at: float | None = None


def failure_report(job_id: str, failures: list[Failure], *, restarts_used: int, max_restarts: int,
                   fatal: str = "") -> str:
    """A failed job in words: the first observed failure first (the root cause), then the rest.

    ``fatal`` is why a job failed without any rank failing (a checkpoint it must not resume)."""
    if fatal:
        return f"job {job_id} failed: {fatal}"
    if not failures:
        return f"job {job_id}: no failures"
    first, *rest = failures
    lines = [
        f"job {job_id} failed: restart budget spent ({restarts_used} of {max_restarts} restarts used).",
        f"Root cause (first observed failure): attempt {first.attempt}, rank {first.rank}: "
        f"[{first.cause.value}] {first.message}",
    ]
    if rest:
        lines.append("Other failures, in the order observed:")
        lines += [f"  attempt {f.attempt}, rank {f.rank}: [{f.cause.value}] {f.message}" for f in rest]
    return "\n".join(lines)
