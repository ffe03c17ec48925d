"""Job records in SQLite under the server's state directory.

One row per job: the request, the state, the attempt and restart counts, the
reason it ended. Logs and events are files in the job's own directory beside
the database. SQLite in WAL mode with synchronous=FULL: a row the API
acknowledged survives a SIGKILL of the server.

Every call runs in a worker thread, one at a time (a ``CapacityLimiter`` of
1 serialises them on the one connection): with ``synchronous=FULL`` a write
waits for an fsync, and with 100 k rows a scan takes seconds, and the event
loop that calls these also serves the ranks' heartbeats. Listings are
bounded; the purge works in batches (``finished``, ``delete_many``).
"""

from __future__ import annotations

import functools
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import msgspec
import trio

from rankwarden.api._schema import JobInfo, JobRequest

__all__ = ["JobDB"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    request     TEXT NOT NULL,
    state       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    restarts    INTEGER NOT NULL DEFAULT 0,
    reason      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
CREATE INDEX IF NOT EXISTS jobs_state_updated ON jobs(state, updated_at);
"""
#: Columns added after the first release, with their definitions: added to
#: an older database when it is opened.
_ADDED = {"stop_requested": "INTEGER NOT NULL DEFAULT 0"}
_COLUMNS = "job_id, request, state, created_at, updated_at, attempt, restarts, reason"


class JobDB:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # The file holds every job's request: owner-only. SQLite gives its
        # -wal and -shm files the database file's mode.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED.items():
            if name not in have:
                self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")
        self._limiter = trio.CapacityLimiter(1)

    def close(self) -> None:
        self._conn.close()

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await trio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._limiter)

    # -- async face: what the server calls ----------------------------------------------

    async def insert(self, job_id: str, request: JobRequest, state: str) -> JobInfo:
        return await self._run(self.insert_now, job_id, request, state)

    async def update(self, job_id: str, **fields: Any) -> None:
        await self._run(self.update_now, job_id, **fields)

    async def delete_many(self, job_ids: list[str]) -> None:
        await self._run(self._delete_many, job_ids)

    async def exists(self, job_id: str) -> bool:
        return await self._run(self._exists, job_id)

    async def get(self, job_id: str) -> JobInfo | None:
        return await self._run(self._get, job_id)

    async def list(self, *, states: list[str] | None = None, offset: int = 0, limit: int = 100) -> tuple[list[JobInfo], int]:
        return await self._run(self._list, states, offset, limit)

    async def finished(self, states: list[str], updated_before: float, limit: int) -> list[str]:
        """Up to ``limit`` ids of jobs in ``states`` last updated before the cutoff (one purge batch)."""
        return await self._run(self._finished, states, updated_before, limit)

    async def counts(self) -> dict[str, int]:
        """Jobs per state (from the index; no rows are decoded)."""
        return await self._run(lambda: dict(self._conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")))

    async def stop_requested(self, job_id: str) -> bool:
        return await self._run(self._stop_requested, job_id)

    # -- the work, on the worker thread (also used directly by tools and tests) --------

    def insert_now(self, job_id: str, request: JobRequest, state: str) -> JobInfo:
        now = time.time()
        self._conn.execute(
            "INSERT INTO jobs (job_id, request, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (job_id, msgspec.json.encode(request).decode(), state, now, now),
        )
        return self._get(job_id)  # type: ignore[return-value]

    def update_now(self, job_id: str, *, state: str | None = None, attempt: int | None = None,
                   restarts: int | None = None, reason: str | None = None, stop_requested: bool | None = None,
                   request: JobRequest | None = None) -> None:
        fields, values = ["updated_at = ?"], [time.time()]
        encoded = msgspec.json.encode(request).decode() if request is not None else None
        stop = int(stop_requested) if stop_requested is not None else None
        for name, value in (("state", state), ("attempt", attempt), ("restarts", restarts), ("reason", reason),
                            ("stop_requested", stop), ("request", encoded)):
            if value is not None:
                fields.append(f"{name} = ?")
                values.append(value)
        self._conn.execute(f"UPDATE jobs SET {', '.join(fields)} WHERE job_id = ?", (*values, job_id))

    def _delete_many(self, job_ids: list[str]) -> None:
        with self._conn:  # one transaction, one fsync for the batch
            self._conn.execute("BEGIN")
            self._conn.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids])

    def _exists(self, job_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is not None

    def _get(self, job_id: str) -> JobInfo | None:
        row = self._conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _info(row) if row else None

    def _stop_requested(self, job_id: str) -> bool:
        row = self._conn.execute("SELECT stop_requested FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def _list(self, states: list[str] | None, offset: int, limit: int) -> tuple[list[JobInfo], int]:
        where, params = "", []
        if states:
            where = f"WHERE state IN ({', '.join('?' for _ in states)})"
            params = list(states)
        total = self._conn.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()[0]
        rows = self._conn.execute(
            f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY created_at, job_id LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ).fetchall()
        return [_info(row) for row in rows], total

    def _finished(self, states: list[str], updated_before: float, limit: int) -> list[str]:
        rows = self._conn.execute(
            f"SELECT job_id FROM jobs WHERE state IN ({', '.join('?' for _ in states)}) AND updated_at <= ? "
            "ORDER BY updated_at LIMIT ?", (*states, updated_before, limit)).fetchall()
        return [row[0] for row in rows]


def _info(row) -> JobInfo:
    job_id, request, state, created, updated, attempt, restarts, reason = row
    return JobInfo(job_id=job_id, request=msgspec.json.decode(request, type=JobRequest), state=state,
                   created_at=created, updated_at=updated, attempt=attempt, restarts_used=restarts, reason=reason)
