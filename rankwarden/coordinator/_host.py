"""What a rank runner and the committer need from the job that hosts them.

``RankRunner`` and ``Committer`` depend on these small Protocols, not on the
whole ``Coordinator``: a test can host them with a fake, and the coordinator's
other state (the restart policy's counters, the heartbeat server) stays out
of their reach.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from rankwarden import protocol
    from rankwarden.coordinator._rank import RankRunner
    from rankwarden.events import Event, Failure
    from rankwarden.launcher import LaunchRequest, Launcher
    from rankwarden.spec import JobSpec

__all__ = ["CommitHost", "RankHost"]


class _Emits(Protocol):
    spec: "JobSpec"
    job_id: str

    def emit(self, kind: "type[Event]", **fields: Any) -> "Event": ...


class RankHost(_Emits, Protocol):
    """The job as one of its rank runners sees it."""

    launcher: "Launcher"
    stopping: bool

    def wall_time(self) -> float: ...

    def record_failure(self, failure: "Failure") -> None: ...

    def build_request(self, rank: int, attempt: int) -> "LaunchRequest": ...

    def checkpoint_ready(self, runner: "RankRunner", message: "protocol.CheckpointReady") -> None: ...

    def checkpoint_failed(self, runner: "RankRunner", message: "protocol.CheckpointFailed") -> None: ...

    def live_message(self, runner: "RankRunner", message: Any) -> None:
        """A live-recovery message of a rank (``protocol.LiveReady``, ``protocol.LiveJoined``)."""


class CommitHost(_Emits, Protocol):
    """The job as its checkpoint committer sees it."""

    @property
    def attempt(self) -> int: ...

    @property
    def world_size(self) -> int:
        """How many ranks the current attempt has (fewer than the spec's after an elastic job lost nodes)."""

    def broadcast(self, message: Any) -> None: ...
