"""The object-store backend (S3, GCS, memory://) through fsspec: no rename, so a step's
payloads go under a per-writer tag prefix and the create-only manifest names the winner's.
See ``_backends`` for the layout and the garbage a crash leaves."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import uuid
from typing import Collection

from rankwarden.checkpoint._backends import (
    LATEST,
    LEASES,
    MANIFEST,
    Payload,
    _Backend,
    scratch_dir,
)
from rankwarden.checkpoint._checksum import checksum_bytes, checksum_chunks, checksum_file, read_checksummed
from rankwarden.checkpoint._faults import fault_point
from rankwarden.checkpoint._manifest import FileEntry, parse_step_dir, step_dir_name

__all__ = ["ObjectBackend"]

log = logging.getLogger(__name__)


class ObjectBackend(_Backend):
    """An fsspec filesystem without atomic rename: payloads under the writer's tag, manifest last."""

    atomic_rename = False
    #: Size of one multipart upload part for streamed payloads (S3 allows 5 MiB and up).
    part_size = 64 << 20

    def __init__(self, fs, base: str) -> None:
        self.fs = fs
        self.base = base.rstrip("/")

    def join(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def staging_dir(self, step: int, tag: str) -> str:
        return self.join(step_dir_name(step), tag)

    def payload_dir(self, tag: str) -> str:
        return tag

    def write_payload(self, directory: str, name: str, payload: Payload, rank: int | None) -> FileEntry:
        path = posixpath.join(directory, name)
        if hasattr(payload, "chunks"):
            # Streamed: no local copy. A writer killed midway leaves at most an
            # incomplete multipart upload, which cleanup aborts.
            chunks = list(payload.chunks())
            f = self.fs.open(path, "wb", block_size=self.part_size)
            try:
                for i, chunk in enumerate(chunks):
                    f.write(chunk)
                    if i == len(chunks) // 2:
                        fault_point("mid_payload")
            except BaseException:
                with contextlib.suppress(Exception):
                    if hasattr(f, "discard"):
                        f.discard()  # abort the multipart upload; never complete half a file
                    f.closed = True
                raise
            f.close()
            checksum, size = checksum_chunks(chunks), sum(len(c) for c in chunks)
        elif callable(payload):
            local = os.path.join(scratch_dir(), f"{uuid.uuid4().hex[:12]}-{name}")
            try:
                payload(local)
                checksum = checksum_file(local)
                size = os.path.getsize(local)
                self.fs.put_file(local, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(local)
        else:
            data = bytes(payload)
            checksum, size = checksum_bytes(data), len(data)
            self.fs.pipe_file(path, data)
        return FileEntry(name=name, size=size, checksum=checksum, rank=rank)

    def commit(self, staging: str, step: int, manifest: bytes) -> bool:
        """Write ``step``'s manifest create-only; False if another writer's is already there."""
        step_dir = self.join(step_dir_name(step))
        path = posixpath.join(step_dir, MANIFEST)
        self.fs.invalidate_cache(step_dir)
        try:
            self.fs.pipe_file(path, manifest, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # an fsspec filesystem without create-only writes
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, manifest)
        fault_point("after_rename")
        return True

    def write_latest(self, step: int) -> None:
        self.fs.pipe_file(self.join(LATEST), (step_dir_name(step) + "\n").encode())

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def read_checksummed(self, path: str, size: int, algorithm: str) -> tuple[bytearray, str, bool]:
        with self.fs.open(path, "rb") as f:
            return read_checksummed(f, size, algorithm)

    def size(self, path: str) -> int | None:
        try:
            return int(self.fs.size(path))
        except FileNotFoundError:
            return None

    def checksum(self, path: str, algorithm: str) -> str:
        return checksum_file(path, algorithm, opener=self.fs.open)

    def _names(self, path: str | None = None) -> list[str]:
        path = path or self.base
        self.fs.invalidate_cache(path)
        try:
            return [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False)]
        except FileNotFoundError:
            return []

    def step_dirs(self) -> dict[int, str]:
        return {step: self.join(name) for name in self._names() if (step := parse_step_dir(name)) is not None}

    def garbage(self, keep_tags: Collection[str] = ()) -> list[str]:
        """Payload prefixes that no manifest names, except those of the attempts in ``keep_tags``.

        A step whose manifest cannot be read is left alone (retention's). A
        manifest key is never garbage: a step committed meanwhile keeps it."""
        found = []
        for path in sorted(self.step_dirs().values()):
            entries = self._names(path)
            named = None
            if MANIFEST in entries:
                try:
                    named = json.loads(self.read(posixpath.join(path, MANIFEST))).get("payload_dir", "")
                except FileNotFoundError:
                    pass  # removed meanwhile: the step is gone
                except (ValueError, AttributeError):
                    continue
                if named is not None and not isinstance(named, str):
                    continue
            for entry in entries:
                if entry == MANIFEST or entry in keep_tags:
                    continue
                if named is not None and (entry == named or not named):
                    continue  # the committed files (or, in the old layout, files beside the manifest)
                found.append(posixpath.join(path, entry))
        return found

    def remove(self, path: str) -> None:
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass

    def remove_step(self, path: str) -> None:
        # The manifest goes first: from then on the step does not exist.
        try:
            self.fs.rm_file(posixpath.join(path, MANIFEST))
        except FileNotFoundError:
            pass
        self.remove(path)

    # -- reading leases: one small object per reader ---------------------------------

    def put_lease(self, name: str, data: bytes) -> None:
        self.fs.pipe_file(self.join(LEASES, name), data)  # one PUT: never half a lease

    def leases(self) -> list[str]:
        return sorted(self._names(self.join(LEASES)))

    def read_lease(self, name: str) -> bytes:
        return self.read(self.join(LEASES, name))

    def remove_lease(self, name: str) -> None:
        try:
            self.fs.rm_file(self.join(LEASES, name))
        except FileNotFoundError:
            pass

    # -- incomplete multipart uploads (S3 only) -----------------------------------------

    def incomplete_uploads(self) -> list[tuple[str, str]]:
        """(key path, upload id) of every multipart upload under this job that never completed."""
        if not hasattr(self.fs, "call_s3"):
            return []
        bucket, _, prefix = self.base.partition("/")
        found, markers = [], {}
        while True:
            page = self.fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=f"{prefix}/", **markers)
            found += [(f"{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    def abort_upload(self, path: str, upload_id: str) -> None:
        bucket, _, key = path.partition("/")
        self.fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload_id)

    def tag_of(self, path: str) -> str | None:
        """The writer's tag of a payload key ``<base>/step_N/<tag>/<name>``, or None."""
        parts = path[len(self.base) + 1:].split("/") if path.startswith(self.base + "/") else []
        return parts[1] if len(parts) == 3 and parse_step_dir(parts[0]) is not None else None

    def destroy(self) -> None:
        for path, upload_id in self.incomplete_uploads():
            self.abort_upload(path, upload_id)
        for path in self.step_dirs().values():  # the steps stop existing first
            try:
                self.fs.rm_file(posixpath.join(path, MANIFEST))
            except FileNotFoundError:
                pass
        self.remove(self.base)
        self.fs.invalidate_cache(self.base)
