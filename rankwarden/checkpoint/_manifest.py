"""The manifest: the commit record of one checkpoint step.

    <root>/<job>/step_000001230/manifest.json

A step exists if and only if its manifest exists and verifies. It is written
last, after every payload it lists is durable, so a reader that finds it can
trust the listed files to be complete; sizes are checked when a step is
chosen, checksums when a file is read.
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec

from rankwarden.errors import CorruptCheckpoint

__all__ = ["FORMAT_VERSION", "LAYOUTS", "FileEntry", "Manifest", "Writer", "parse_step_dir", "step_dir_name"]

FORMAT_VERSION = 1
LAYOUTS = ("rank", "dcp")
_STEP_DIR = re.compile(r"^step_(\d{9,})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def parse_step_dir(name: str) -> int | None:
    """The step of a committed-step directory name, or None for anything else."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


class FileEntry(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    size: int
    #: "sha256:<hex>"
    checksum: str
    rank: int | None = None


class Writer(msgspec.Struct, frozen=True, kw_only=True):
    """What wrote a checkpoint: the fingerprint that resume compares before trusting it.

    A step is resumed silently only by a job with the same fingerprint; one
    with another ``world_size`` is refused, one with another run, entrypoint
    or arguments only when asked to explicitly (``JobSpec.resume``)."""

    #: The run that wrote it: empty for "whoever runs this same command"
    #: (``rankwarden run``), unique per submitted job for the REST API.
    run_id: str = ""
    entrypoint: str
    args: list[str] = []
    world_size: int

    def differences(self, other: "Writer") -> list[str]:
        """What differs between two writers, in words (empty: the same fingerprint)."""
        out = []
        for name in ("world_size", "run_id", "entrypoint", "args"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name} {theirs!r} (this job: {mine!r})")
        return out


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    format: int = FORMAT_VERSION
    job: str
    step: int
    world_size: int
    files: list[FileEntry]
    created_at: float = msgspec.field(default_factory=time.time)
    metadata: dict[str, Any] = {}
    #: None in manifests written before fingerprints existed: resume treats them as foreign.
    writer: Writer | None = None
    #: Where the files are, relative to the step directory: "" (in it), or on
    #: object stores the writer's tag, which keeps two writers' payloads apart.
    payload_dir: str = ""
    #: Commit order within the job: one more than the highest committed before.
    #: 0 in manifests written before it existed (they order by ``created_at``).
    commit_seq: int = 0
    #: How the state is laid out: "rank" (one opaque file per rank, resumable
    #: only by the same world size) or "dcp" (a torch.distributed.checkpoint
    #: checkpoint: ``.metadata`` plus each rank's ``__<rank>_0.distcp``, next to
    #: the per-rank files; resharded on load, so resumable by another world size).
    #: "rank" in manifests written before the field existed.
    layout: str = "rank"

    def file(self, name: str) -> FileEntry:
        for entry in self.files:
            if entry.name == name:
                return entry
        raise KeyError(f"step {self.step} has no file {name!r}; it has {[f.name for f in self.files]}")

    def encode(self) -> bytes:
        return msgspec.json.format(msgspec.json.encode(self))

    @classmethod
    def decode(cls, raw: bytes, *, where: str) -> "Manifest":
        try:
            manifest = msgspec.json.decode(raw, type=cls)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptCheckpoint(f"{where}: manifest does not parse: {exc}") from None
        if manifest.format != FORMAT_VERSION:
            raise CorruptCheckpoint(f"{where}: manifest format {manifest.format}, this rankwarden reads {FORMAT_VERSION}")
        if manifest.layout not in LAYOUTS:
            raise CorruptCheckpoint(f"{where}: manifest layout {manifest.layout!r}, this rankwarden reads {list(LAYOUTS)}")
        names = [f.name for f in manifest.files]
        if len(set(names)) != len(names) or any("/" in n or n in ("", ".", "..") for n in names):
            raise CorruptCheckpoint(f"{where}: manifest lists invalid or duplicate file names {names}")
        if "/" in manifest.payload_dir or manifest.payload_dir in (".", "..", "manifest.json"):
            raise CorruptCheckpoint(f"{where}: manifest names an invalid payload directory {manifest.payload_dir!r}")
        return manifest
