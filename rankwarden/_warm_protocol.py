"""The warm-start protocol between a launcher and its zygote: the only place it is defined.

Transport: one Unix socket pair, inherited by the zygote as a file descriptor.
Frames are the heartbeat protocol's (4-byte big-endian length, msgpack of one
tagged Struct). The zygote handles one request at a time and answers each in
order, so the launcher needs no reader task: it sends a request and reads the
answer under one lock.

    zygote -> launcher, once:    Ready (imports done, single-threaded) | Unavailable
    launcher -> zygote:          Spawn   -> Spawned (child pid) | Refused (why; start it fresh)
                                 Reap    -> Reaped (the child's returncode, as subprocess has it)

``Reap`` exists so that the launcher keeps ``LocalProcess``'s discipline for
ranks it did not fork itself: the zygote never reaps a child on its own, so
the launcher can kill the child's process group while the exited leader still
pins the group id, then ask for the reap.

Imports only msgspec: the zygote side must not pull in trio.
"""

from __future__ import annotations

from typing import Union

import msgspec

from rankwarden.protocol import FrameDecoder, encode

__all__ = [
    "WARM_PROTOCOL_VERSION",
    "FromZygote",
    "FrameDecoder",
    "Reap",
    "Reaped",
    "Ready",
    "Refused",
    "Spawn",
    "Spawned",
    "ToZygote",
    "Unavailable",
    "encode",
]

WARM_PROTOCOL_VERSION = 1


class _Message(msgspec.Struct, frozen=True, tag_field="type"):
    pass


class Ready(_Message, tag="ready"):
    version: int
    pid: int
    #: Seconds the zygote spent importing (for the log and the benchmark).
    import_seconds: float
    modules: list[str] = []


class Unavailable(_Message, tag="unavailable"):
    """The zygote cannot fork ranks (an import failed, a thread was started): it exits next."""

    reason: str


class Spawn(_Message, tag="spawn"):
    mode: str  # "script" or "module"
    target: str
    args: list[str]
    env: dict[str, str]
    cwd: str
    stdout_path: str
    stderr_path: str


class Spawned(_Message, tag="spawned"):
    pid: int


class Refused(_Message, tag="refused"):
    reason: str


class Reap(_Message, tag="reap"):
    pid: int


class Reaped(_Message, tag="reaped"):
    pid: int
    #: subprocess's convention: -N for "killed by signal N".
    returncode: int


ToZygote = Union[Spawn, Reap]
FromZygote = Union[Ready, Unavailable, Spawned, Refused, Reaped]
