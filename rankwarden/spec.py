"""The job spec: everything the coordinator needs to run one job.

A spec is plain data (a frozen msgspec Struct) so that the CLI, the REST API and
a custom launcher all build the same thing, and so that it round-trips through
JSON unchanged. ``JobSpec.from_dict`` is the validating entry point for
untrusted input: every error names the field that was wrong.
"""

from __future__ import annotations

import enum
import re
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from rankwarden.errors import SpecError

__all__ = ["Backoff", "JobSpec", "Resources", "RestartScope", "JOB_ID_PATTERN"]

#: Job ids end up in file paths, pod names and URLs: keep them boring.
JOB_ID_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_JOB_ID_RE = re.compile(JOB_ID_PATTERN)

#: A Kubernetes resource quantity: "4", "500m", "16Gi", "1.5", "2e3".
_QUANTITY_RE = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|[eE][0-9]+)?$")

PositiveFloat = Annotated[float, Meta(gt=0)]
NonNegativeFloat = Annotated[float, Meta(ge=0)]


class RestartScope(str, enum.Enum):
    """What restarts when one rank fails.

    ``group``: every rank of the attempt is stopped and all relaunch together
    (DDP: the process group cannot survive losing a member).
    ``rank``: only the failed rank restarts (independent workers).
    """

    GROUP = "group"
    RANK = "rank"


class Backoff(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Delay before restart ``n`` (1-based): ``min(max, initial * factor**(n-1))``,
    then multiplied by a uniform factor in ``[1 - jitter, 1 + jitter]``."""

    initial: NonNegativeFloat = 1.0
    factor: Annotated[float, Meta(ge=1)] = 2.0
    max: NonNegativeFloat = 30.0
    jitter: Annotated[float, Meta(ge=0, le=1)] = 0.1

    def delay(self, restart: int, rand: float) -> float:
        """The delay before restart number ``restart`` given ``rand`` in [0, 1)."""
        if restart < 1:
            raise ValueError(f"restart numbers start at 1, got {restart}")
        try:
            base = min(self.max, self.initial * self.factor ** (restart - 1))
        except OverflowError:  # a huge restart count: the cap applies
            base = self.max
        return base * (1.0 - self.jitter + 2.0 * self.jitter * rand)


class Resources(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one rank needs, for launchers that schedule ranks (Kubernetes).

    ``cpu`` and ``memory`` are Kubernetes quantities ("4", "500m", "16Gi"), set
    as both request and limit; ``gpu`` is a count of ``nvidia.com/gpu``. The
    process launcher ignores them: a local rank gets what the machine has."""

    cpu: str = ""
    memory: str = ""
    gpu: Annotated[int, Meta(ge=0, le=64)] = 0


class JobSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One job: what to run, on how many ranks, and how to keep it alive.

    ``entrypoint`` is a script path (the default), a module name (``module``)
    or an executable (``no_python``), followed by ``args``.
    """

    entrypoint: Annotated[str, Meta(min_length=1)]
    args: list[str] = []
    module: bool = False
    no_python: bool = False
    #: Interpreter for script/module entrypoints; empty means the coordinator's own.
    python: str = ""
    world_size: Annotated[int, Meta(ge=1, le=65536)] = 1
    env: dict[str, str] = {}
    cwd: str | None = None
    #: Empty: the coordinator generates one from the entrypoint's name.
    job_id: str = ""
    #: Where per-rank logs and events.jsonl go; empty: ``./rankwarden-jobs/<job_id>``.
    job_dir: str = ""
    checkpoint_url: str | None = None
    #: Identifies this run in the checkpoints it writes. Empty: the job is its
    #: command (entrypoint, args, world size): running the same command again
    #: resumes it. The REST API sets a fresh one per submitted job, so a new
    #: job that reuses an old job's id never resumes the old one's training.
    run_id: Annotated[str, Meta(max_length=128, pattern=r"^[A-Za-z0-9._:-]*$")] = ""
    #: Resume a committed checkpoint even if another run wrote it (other run
    #: id, entrypoint or args). Without it such a checkpoint fails the job
    #: with a message saying whose it is. Another world size is always refused.
    resume: bool = False
    #: Keep the newest N committed checkpoints (and every ``keep_every``-th step); 0 keeps all.
    keep_checkpoints: Annotated[int, Meta(ge=0)] = 0
    keep_every: Annotated[int, Meta(ge=0)] = 0
    master_addr: str = "127.0.0.1"
    #: Container image of each rank, for launchers that run containers; empty:
    #: the launcher's default image.
    image: str = ""
    resources: Resources = Resources()
    #: Start restarted ranks of a script or module from a pre-imported
    #: interpreter (a zygote that has imported torch) when the launcher has one;
    #: False: every rank is a fresh interpreter.
    warm: bool = True

    heartbeat_timeout: PositiveFloat = 5.0
    #: Seconds between heartbeats; 0 means heartbeat_timeout / 5.
    heartbeat_interval: NonNegativeFloat = 0.0
    #: Seconds without ``step`` advancing (once a rank reported one); 0 disables.
    progress_timeout: NonNegativeFloat = 300.0
    #: Seconds from spawn to the rank's hello; 0: the rank need not connect at all.
    #: None: 60 for scripts and modules (the bootstrap says hello before the
    #: script runs), 0 for ``no_python`` commands (they connect only if they use
    #: ``rankwarden.worker`` themselves).
    startup_timeout: NonNegativeFloat | None = None

    restart_scope: RestartScope = RestartScope.GROUP
    max_restarts: Annotated[int, Meta(ge=0, le=100000)] = 3
    backoff: Backoff = Backoff()
    #: SIGTERM -> SIGKILL grace when tearing ranks down after a failure.
    kill_grace: NonNegativeFloat = 5.0
    #: How long a graceful stop waits for ranks to checkpoint and exit.
    stop_grace: NonNegativeFloat = 30.0
    #: Live recovery (scope ``group``, scripts that train through
    #: ``rankwarden.worker.live``): a failed rank is killed and replaced while
    #: the survivors keep their processes and state; see coordinator/_live.py.
    live: bool = False
    #: Seconds from a failure until every rank trains in the new process group;
    #: past it the attempt falls back to a group restart.
    live_timeout: PositiveFloat = 120.0

    def __post_init__(self) -> None:
        # msgspec turns a ValueError here into a ValidationError; from_dict
        # turns that into a SpecError. Cross-field rules live here.
        if self.module and self.no_python:
            _invalid("no_python", "`module` and `no_python` cannot both be set")
        if self.job_id and not _JOB_ID_RE.match(self.job_id):
            _invalid(
                "job_id",
                f"job_id {self.job_id!r} must be 1-63 lowercase letters, digits or '-', "
                "starting and ending with a letter or digit",
            )
        if self.heartbeat_interval and self.heartbeat_interval >= self.heartbeat_timeout:
            _invalid(
                "heartbeat_interval",
                f"heartbeat_interval ({self.heartbeat_interval}) must be shorter than "
                f"heartbeat_timeout ({self.heartbeat_timeout})",
            )
        for key, value in self.env.items():
            if not key or "=" in key or "\0" in key:
                _invalid("env", f"env key {key!r} is not a valid variable name")
            if "\0" in value:
                _invalid("env", f"env value of {key!r} contains a NUL byte")
        for name in ("cpu", "memory"):
            value = getattr(self.resources, name)
            if value and not _QUANTITY_RE.match(value):
                _invalid(
                    f"resources.{name}",
                    f"{value!r} is not a Kubernetes quantity (examples: '4', '500m', '16Gi')",
                )
        if self.live and self.restart_scope != RestartScope.GROUP:
            _invalid("live", "live recovery replaces one rank of a process group: it needs restart_scope 'group'")
        if any(c.isspace() for c in self.image):
            _invalid("image", f"image {self.image!r} contains whitespace")
        if "\0" in self.entrypoint:
            _invalid("entrypoint", "entrypoint contains a NUL byte")
        for i, arg in enumerate(self.args):
            if "\0" in arg:
                _invalid(f"args[{i}]", "argument contains a NUL byte")

    @property
    def effective_heartbeat_interval(self) -> float:
        return self.heartbeat_interval or self.heartbeat_timeout / 5.0

    @property
    def effective_startup_timeout(self) -> float:
        if self.startup_timeout is not None:
            return self.startup_timeout
        return 0.0 if self.no_python else 60.0

    @classmethod
    def from_dict(cls, data: Any) -> "JobSpec":
        """Validate untrusted data (parsed JSON) into a spec, or raise SpecError."""
        try:
            return msgspec.convert(data, cls)
        except msgspec.ValidationError as exc:
            raise _spec_error(exc) from None

    @classmethod
    def from_json(cls, raw: bytes | str) -> "JobSpec":
        """Validate a JSON document into a spec, or raise SpecError."""
        try:
            return msgspec.json.decode(raw, type=cls)
        except msgspec.ValidationError as exc:
            raise _spec_error(exc) from None
        except msgspec.DecodeError as exc:
            raise SpecError(f"job spec is not valid JSON: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)

    def replace(self, **changes: Any) -> "JobSpec":
        """A copy with ``changes`` applied and validated again."""
        data = self.to_dict()
        data.update(msgspec.to_builtins(changes))
        return JobSpec.from_dict(data)


def _invalid(field: str, message: str) -> None:
    # Same suffix as msgspec's own errors, so _spec_error finds the path.
    raise ValueError(f"{message} - at `$.{field}`")


def _spec_error(exc: msgspec.ValidationError) -> SpecError:
    # msgspec ends messages with " - at `$.field`"; for a field that is missing
    # or unknown it names it in the text instead ("unknown field `colour`").
    message = str(exc)
    path = "$"
    match = re.search(r" - at `([^`]*)`$", message)
    if match:
        path = match.group(1)
    else:
        named = re.search(r"field `([^`]+)`", message)
        if named:
            path = f"$.{named.group(1)}"
    return SpecError(f"invalid job spec: {message}", path=path)
