"""rankwarden keeps distributed PyTorch training alive.

The public names below load on first use (PEP 562): ranks import
``rankwarden.worker`` at start-up and must not pay for trio, the coordinator
or anything else they do not run. ``import rankwarden`` never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AuthError": "rankwarden.errors",
    "Backoff": "rankwarden.spec",
    "CheckpointError": "rankwarden.errors",
    "CheckpointRefused": "rankwarden.errors",
    "CheckpointStore": "rankwarden.checkpoint",
    "CorruptCheckpoint": "rankwarden.errors",
    "Manifest": "rankwarden.checkpoint",
    "Coordinator": "rankwarden.coordinator",
    "Event": "rankwarden.events",
    "ExitStatus": "rankwarden.launcher",
    "Failure": "rankwarden.events",
    "FailureCause": "rankwarden.events",
    "JobFailed": "rankwarden.errors",
    "JobSnapshot": "rankwarden.events",
    "JobSpec": "rankwarden.spec",
    "JobState": "rankwarden.events",
    "LaunchError": "rankwarden.errors",
    "LaunchRequest": "rankwarden.launcher",
    "Launcher": "rankwarden.launcher",
    "ProcessLauncher": "rankwarden.launcher",
    "ProtocolError": "rankwarden.errors",
    "RankProcess": "rankwarden.launcher",
    "RankSnapshot": "rankwarden.events",
    "RankState": "rankwarden.events",
    "RankwardenError": "rankwarden.errors",
    "RestartScope": "rankwarden.spec",
    "SpecError": "rankwarden.errors",
    "run_job": "rankwarden.coordinator",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rankwarden' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # pragma: no cover
    from rankwarden.checkpoint import CheckpointStore, Manifest
    from rankwarden.coordinator import Coordinator, run_job
    from rankwarden.errors import AuthError, CheckpointError, CheckpointRefused, CorruptCheckpoint, JobFailed, LaunchError, ProtocolError, RankwardenError, SpecError
    from rankwarden.events import Event, Failure, FailureCause, JobSnapshot, JobState, RankSnapshot, RankState
    from rankwarden.launcher import ExitStatus, LaunchRequest, Launcher, ProcessLauncher, RankProcess
    from rankwarden.spec import Backoff, JobSpec, RestartScope
