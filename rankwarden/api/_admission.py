"""What a submitted job may run, and how much of the host it may take.

The allowlist is the wall between "run my training job" and "run anything as
the server's user", so it is matched strictly:

- on the *real* path of the entrypoint (symlinks and ``..`` resolved), and the
  literal head of each pattern is resolved the same way (``/srv`` may itself be
  a symlink);
- segment by segment: ``*``, ``?`` and ``[...]`` match within one path segment
  and never cross ``/`` (``fnmatch`` alone lets ``*`` match ``/``, so
  ``/srv/*.py`` allowed every script below ``/srv``, a virtualenv included);
  ``**`` as a whole segment matches any number of segments, and only where an
  operator wrote it;
- ``module:NAME`` patterns match dotted module names the same way, with ``.``
  as the separator.

The check runs at submit and again whenever a server restarts a job, so a
pattern removed from ``--allow`` takes effect for jobs already recorded.

Limits (``Limits``) are server-wide: total ranks and concurrent jobs (429
when the server is full), and the smallest timeouts and largest restart
budget a request may ask for (422 otherwise). Every refusal names the limit.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field

from rankwarden.api._schema import JobRequest
from rankwarden.errors import ApiError
from rankwarden.spec import JOB_ID_PATTERN

__all__ = ["Limits", "check_allowed", "check_job_id", "check_limits", "path_matches"]

_GLOB = re.compile(r"[*?\[]")
_JOB_ID = re.compile(JOB_ID_PATTERN.strip("^$"))


def path_matches(pattern: str, candidate: str) -> bool:
    """Whether ``candidate`` matches ``pattern`` segment by segment (see the module docstring)."""
    if pattern.startswith("module:") or candidate.startswith("module:"):
        if not (pattern.startswith("module:") and candidate.startswith("module:")):
            return False
        return _segments_match(pattern[7:].split("."), candidate[7:].split("."))
    return _segments_match(pattern.split("/"), candidate.split("/"))


def _segments_match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        # Zero or more whole segments: try every split point.
        return any(_segments_match(rest, parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _segments_match(rest, parts[1:])


def resolve_pattern(pattern: str) -> str:
    """The pattern with its literal (glob-free) leading directories resolved to their real path."""
    if pattern.startswith("module:") or not os.path.isabs(pattern):
        return pattern
    parts = pattern.split("/")
    literal = 0
    while literal < len(parts) - 1 and not _GLOB.search(parts[literal]):
        literal += 1
    head = "/".join(parts[:literal]) or "/"
    return "/".join([os.path.realpath(head).rstrip("/"), *parts[literal:]])


def check_job_id(job_id: str) -> str:
    # fullmatch: a pattern ending in `$` also accepts a final "\n".
    if not _JOB_ID.fullmatch(job_id):
        raise ApiError(400, f"invalid job id {job_id!r}", "job ids are 1-63 lowercase letters, digits or '-'")
    return job_id


def check_allowed(request: JobRequest, allow: list[str]) -> str:
    """The entrypoint to run (the real path, or the module name) if a pattern allows it; else 403."""
    for value in (request.entrypoint, *request.args):
        if any(ord(c) < 32 and c not in "\t" for c in value):
            raise ApiError(400, "entrypoint and args may not contain control characters or NUL")
    if request.job_id is not None:
        check_job_id(request.job_id)
    if request.module:
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", request.entrypoint):
            raise ApiError(400, f"{request.entrypoint!r} is not a Python module name")
        resolved = request.entrypoint
        candidate = f"module:{resolved}"
    else:
        if not os.path.isabs(request.entrypoint):
            # Relative to what? The server's cwd is not the caller's: refuse.
            raise ApiError(400, f"entrypoint {request.entrypoint!r} is not an absolute path",
                           "send the script's absolute path on the server")
        resolved = candidate = os.path.realpath(request.entrypoint)
    if not any(path_matches(resolve_pattern(pattern), candidate) for pattern in allow):
        raise ApiError(403, f"entrypoint {request.entrypoint!r} is not allowed on this server",
                       "the operator allows entrypoints with `rankwarden serve --allow PATTERN` "
                       "(`*` matches within one directory, `**` across directories)")
    if not request.module and not os.path.isfile(resolved):
        raise ApiError(400, f"entrypoint {request.entrypoint!r} does not exist on the server")
    return resolved


def _host_ranks() -> int:
    # A local rank is a Python process with torch loaded: about a CPU and a
    # few hundred MiB each. Four per CPU, bounded by memory at 512 MiB each.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return max(2, min(4 * cpus, memory // (512 << 20)))


@dataclass
class Limits:
    """Server-wide limits. Defaults are derived from this host's CPUs and memory."""

    #: Ranks of all running jobs together (429 beyond it).
    max_ranks: int = field(default_factory=_host_ranks)
    #: Jobs running at once (429 beyond it).
    max_jobs: int = field(default_factory=_host_ranks)
    #: The smallest heartbeat timeout a job may ask for (422 below it).
    min_heartbeat_timeout: float = 1.0
    #: The smallest progress timeout a job may ask for; 0 (no progress
    #: timeout) is always allowed.
    min_progress_timeout: float = 10.0
    #: The largest restart budget a job may ask for (422 above it).
    max_restarts: int = 100
    #: Requests in flight from one client address, SSE streams included (429 beyond it).
    max_client_requests: int = 64
    #: Open TCP connections from one client address, idle ones included
    #: (beyond it a new connection gets 429 and is closed).
    max_client_connections: int = 128


def check_limits(request: JobRequest, limits: Limits, *, running_jobs: int, running_ranks: int) -> None:
    """422 if the request asks for more than any job may have; 429 if the server is full now."""
    def refuse(status: int, what: str, limit: str, value: object) -> None:
        raise ApiError(status, f"{what} (server limit {limit}={value})",
                       "ask the operator to raise it with `rankwarden serve --limit NAME=VALUE`"
                       if status == 422 else "retry when a running job has finished")

    if request.heartbeat_timeout < limits.min_heartbeat_timeout:
        refuse(422, f"heartbeat_timeout {request.heartbeat_timeout} is too small", "min_heartbeat_timeout",
               limits.min_heartbeat_timeout)
    if 0 < request.progress_timeout < limits.min_progress_timeout:
        refuse(422, f"progress_timeout {request.progress_timeout} is too small", "min_progress_timeout",
               limits.min_progress_timeout)
    if request.max_restarts > limits.max_restarts:
        refuse(422, f"max_restarts {request.max_restarts} is too large", "max_restarts", limits.max_restarts)
    if request.world_size > limits.max_ranks:
        refuse(422, f"world_size {request.world_size} is more than the server runs at once", "max_ranks",
               limits.max_ranks)
    if running_jobs + 1 > limits.max_jobs:
        refuse(429, f"the server already runs {running_jobs} jobs", "max_jobs", limits.max_jobs)
    if running_ranks + request.world_size > limits.max_ranks:
        refuse(429, f"the server already runs {running_ranks} ranks; this job needs {request.world_size} more",
               "max_ranks", limits.max_ranks)
