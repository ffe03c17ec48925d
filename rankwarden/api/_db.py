"""Job records in SQLite under the server's state directory.

One row per job: the request, the state, the attempt and restart counts, the
reason it ended. Logs and events are files in the job's own directory beside
the database. SQLite in WAL mode with synchronous=FULL: a row the API
acknowledged survives a SIGKILL of the server.

Calls are short and local; the server runs them directly on its event loop
thread (a write is a few hundred microseconds), and the connection is used
by that thread only.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import msgspec

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
"""


class JobDB:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        self._conn.close()

    def insert(self, job_id: str, request: JobRequest, state: str) -> JobInfo:
        now = time.time()
        self._conn.execute(
            "INSERT INTO jobs (job_id, request, state, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
            (job_id, msgspec.json.encode(request).decode(), state, now, now),
        )
        return self.get(job_id)  # type: ignore[return-value]

    def update(self, job_id: str, *, state: str | None = None, attempt: int | None = None,
               restarts: int | None = None, reason: str | None = None) -> None:
        fields, values = ["updated_at = ?"], [time.time()]
        for name, value in (("state", state), ("attempt", attempt), ("restarts", restarts), ("reason", reason)):
            if value is not None:
                fields.append(f"{name} = ?")
                values.append(value)
        self._conn.execute(f"UPDATE jobs SET {', '.join(fields)} WHERE job_id = ?", (*values, job_id))

    def delete(self, job_id: str) -> None:
        self._conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def exists(self, job_id: str) -> bool:
        return self._conn.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone() is not None

    def get(self, job_id: str) -> JobInfo | None:
        row = self._conn.execute(
            "SELECT job_id, request, state, created_at, updated_at, attempt, restarts, reason FROM jobs WHERE job_id = ?",
            (job_id,),
        ).fetchone()
        return _info(row) if row else None

    def list(self, *, states: list[str] | None = None, offset: int = 0, limit: int = 100) -> tuple[list[JobInfo], int]:
        where, params = "", []
        if states:
            where = f"WHERE state IN ({', '.join('?' for _ in states)})"
            params = list(states)
        total = self._conn.execute(f"SELECT COUNT(*) FROM jobs {where}", params).fetchone()[0]
        rows = self._conn.execute(
            "SELECT job_id, request, state, created_at, updated_at, attempt, restarts, reason FROM jobs "
            f"{where} ORDER BY created_at, job_id LIMIT ? OFFSET ?",
            (*params, limit, offset),
        ).fetchall()
        return [_info(row) for row in rows], total


def _info(row) -> JobInfo:
    job_id, request, state, created, updated, attempt, restarts, reason = row
    return JobInfo(job_id=job_id, request=msgspec.json.decode(request, type=JobRequest), state=state,
                   created_at=created, updated_at=updated, attempt=attempt, restarts_used=restarts, reason=reason)
