"""Every error rankwarden raises on purpose.

    RankwardenError
    ├── SpecError           a job spec is invalid (names the bad field)
    ├── LaunchError         a rank could not be started
    │   └── KubernetesError  the Kubernetes API refused a call (carries its Status)
    ├── ProtocolError       a heartbeat peer sent something we cannot accept
    │   └── AuthError       ... in particular a wrong token, job or rank
    ├── CheckpointError     a checkpoint could not be written or read
    │   ├── CorruptCheckpoint  a committed step fails verification (size, checksum, manifest)
    │   ├── CheckpointRefused  a committed step is intact but not this job's to resume
    │   │                      (another world size, another run)
    │   └── StepAlreadyCommitted  another writer committed that step first (carries its manifest)
    ├── JobFailed           a job ended failed (carries the failure records)
    ├── ApiError            the API server refuses a request (HTTP status, message, detail)
    └── ApiClientError      the API server answered a client with an error

Third-party errors (msgspec, OSError from the launcher) are translated into
these at one boundary each, so callers only ever catch this tree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from rankwarden.events import Failure

__all__ = [
    "ApiClientError",
    "ApiError",
    "AuthError",
    "CheckpointError",
    "CheckpointRefused",
    "CorruptCheckpoint",
    "JobFailed",
    "KubernetesError",
    "LaunchError",
    "ProtocolError",
    "RankwardenError",
    "SpecError",
    "StepAlreadyCommitted",
]


class RankwardenError(Exception):
    """Base class of every error rankwarden raises on purpose."""


class SpecError(RankwardenError, ValueError):
    """A job spec is invalid. ``path`` names the offending field (``$.world_size``)."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class LaunchError(RankwardenError):
    """A rank's process (or pod) could not be started at all."""


class KubernetesError(LaunchError):
    """The Kubernetes API answered with an error.

    ``status`` is the HTTP code, ``reason`` the Status reason (``AlreadyExists``,
    ``Forbidden``, ``Expired``...), and the message is the API server's own."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def gone(self) -> bool:
        """410: a watch or list asked for a resourceVersion the server has compacted away."""
        return self.status == 410


class ProtocolError(RankwardenError):
    """A heartbeat peer broke the protocol; that peer is dropped, nobody else is."""


class AuthError(ProtocolError):
    """A heartbeat peer presented the wrong token, job, rank or attempt."""


class CheckpointError(RankwardenError):
    """A checkpoint could not be saved, committed or read (I/O error, disk full, ...)."""


class CorruptCheckpoint(CheckpointError):
    """A committed step failed verification; readers skip it and use an older one."""


class CheckpointRefused(CheckpointError):
    """The newest intact step cannot be resumed by this job: written by another
    world size, or by another run without ``resume`` asked for. Never skipped
    silently: resuming it, or something older, would be a wrong result."""


class StepAlreadyCommitted(CheckpointError):
    """A commit lost: ``manifest`` is the step another writer committed first (kept as it is).

    The loser's files were not used; they are garbage for ``CheckpointStore.cleanup``."""

    def __init__(self, message: str, manifest) -> None:
        super().__init__(message)
        self.manifest = manifest


class JobFailed(RankwardenError):
    """A job ended in state ``failed``; ``failures`` leads with the first observed one."""

    def __init__(self, message: str, failures: Sequence["Failure"] = ()) -> None:
        super().__init__(message)
        self.failures = tuple(failures)


class ApiError(RankwardenError):
    """The API server refuses a request: the HTTP ``status``, a message saying
    what happened, and a ``detail`` saying what to do next."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.detail = status, message, detail


class ApiClientError(RankwardenError):
    """The API server answered a client with an error: ``status`` and its message.

    ``status`` is 0 when the server could not be reached at all."""

    def __init__(self, status: int, message: str, detail: str = "") -> None:
        prefix = f"{status}: " if status else ""
        super().__init__(prefix + message + (f" ({detail})" if detail else ""))
        self.status, self.message, self.detail = status, message, detail
