"""The REST API's bodies: every request and response is one of these Structs.

Requests are validated by msgspec (unknown fields refused, limits enforced);
the OpenAPI document is generated from the same types, so the schema can
never drift from the code.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from rankwarden.events import Failure, JobState, RankSnapshot
from rankwarden.spec import JOB_ID_PATTERN, JobSpec, Resources

__all__ = [
    "ErrorBody",
    "Health",
    "JobInfo",
    "JobList",
    "JobRequest",
    "JobSummary",
    "LogLines",
    "PurgeRequest",
    "PurgeResult",
    "DeleteResult",
    "ACTIVE",
    "API_STATES",
    "FINISHED",
]

#: A job's state as the API reports it: the coordinator's states (``JobState``)
#: plus ``interrupted`` (the server stopped while the job ran and did not resume it).
API_STATES: tuple[str, ...] = (*(s.value for s in JobState), "interrupted")
#: States of a job that has not ended yet.
ACTIVE: tuple[str, ...] = tuple(s.value for s in JobState if not s.finished)
#: States of a job that has ended (what a purge may delete).
FINISHED: tuple[str, ...] = tuple(s for s in API_STATES if s not in ACTIVE)
ApiState = Literal[API_STATES]  # type: ignore[valid-type]
#: The API's defaults are JobSpec's: one place to change them.
_SPEC = {f.name: f.default for f in msgspec.structs.fields(JobSpec)}
FinishedState = Literal[FINISHED]  # type: ignore[valid-type]
JobId = Annotated[str, Meta(pattern=JOB_ID_PATTERN, max_length=63)]
Seconds = Annotated[float, Meta(gt=0, le=86400)]


class JobRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What a client may ask for. No interpreter, no environment, no working
    directory, no arbitrary command: either a template the operator defined
    (with typed, ranged params), or an entrypoint that matches one of the
    patterns the operator allowed when starting the server."""

    #: An absolute path (or a module name with ``module``) that an ``--allow``
    #: pattern admits; or leave it empty and name a ``template``.
    entrypoint: Annotated[str, Meta(max_length=4096)] = ""
    args: Annotated[list[Annotated[str, Meta(max_length=4096)]], Meta(max_length=256)] = []
    #: An operator-defined job template (``rankwarden serve --templates``):
    #: its entrypoint and fixed arguments, plus the ``params`` it lets you set.
    template: Annotated[str, Meta(max_length=63)] | None = None
    params: Annotated[dict[Annotated[str, Meta(max_length=63)], int | float | str | bool], Meta(max_length=64)] = {}
    module: bool = False
    world_size: Annotated[int, Meta(ge=1, le=256)] = _SPEC["world_size"]
    job_id: JobId | None = None
    heartbeat_timeout: Seconds = _SPEC["heartbeat_timeout"]
    progress_timeout: Annotated[float, Meta(ge=0, le=86400)] = _SPEC["progress_timeout"]
    max_restarts: Annotated[int, Meta(ge=0, le=1000)] = _SPEC["max_restarts"]
    restart_scope: Literal["group", "rank"] = _SPEC["restart_scope"].value
    #: Give the job a checkpoint store under the server's checkpoint root.
    checkpoint: bool = True
    keep_checkpoints: Annotated[int, Meta(ge=0, le=100000)] = _SPEC["keep_checkpoints"]
    #: Steps the job will run, when known: the summary then has an ETA.
    total_steps: Annotated[int, Meta(ge=1)] | None = None
    #: Per-rank CPU, memory and GPUs, when the server runs ranks as pods.
    resources: Resources = _SPEC["resources"]


class JobInfo(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    state: ApiState
    request: JobRequest
    created_at: float
    updated_at: float
    attempt: int = 0
    restarts_used: int = 0
    reason: str = ""


class JobList(msgspec.Struct, frozen=True, kw_only=True):
    jobs: list[JobInfo]
    total: int
    offset: int
    limit: int


class JobSummary(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    state: ApiState
    attempt: int
    restarts_used: int
    max_restarts: int
    ranks: list[RankSnapshot]
    steps_per_second: float | None = None
    samples_per_second: float | None = None
    step: int | None = None
    total_steps: int | None = None
    eta_seconds: float | None = None
    checkpoint_step: int | None = None
    failures: list[Failure] = []
    #: Seconds from each failure to the first new step after it, in order.
    recovery_seconds: list[float] = []
    #: Share of wall time spent on steps that were kept (not redone after a failure).
    goodput: float | None = None
    wall_seconds: float = 0.0


class LogLines(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    lines: list[dict[str, Any]]


class PurgeRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Which finished jobs to delete. ``states`` is required and not empty: an
    empty body deletes nothing (it is a 400), never everything."""

    states: Annotated[list[FinishedState], Meta(min_length=1)]
    older_than_seconds: Annotated[float, Meta(ge=0)] = 0.0


class PurgeResult(msgspec.Struct, frozen=True, kw_only=True):
    purged: list[str]


class DeleteResult(msgspec.Struct, frozen=True, kw_only=True):
    """What deleting a job removed. Its checkpoints go with it: a job's
    checkpoints are resumable only by that job, so nothing could use them."""

    job_id: str
    #: "deleted": the job's checkpoint store is gone; "none": the job had none.
    checkpoints: Literal["deleted", "none"]
    #: Where they were (``<checkpoint root>/<job_id>``), for the record.
    checkpoint_url: str | None = None


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: Literal["ok"] = "ok"
    version: str
    jobs_running: int


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True):
    error: str
    status: int
    detail: str = ""
