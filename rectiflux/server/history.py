"""The server's history: every job's settings, state, times, error and image names, in SQLite (embedded: no
server to run). Each change is committed at once, so a `kill -9` loses at most the change being written; at start
the jobs a dead process left queued or running are marked interrupted."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    origin TEXT NOT NULL,
    state TEXT NOT NULL,
    settings TEXT NOT NULL,
    images TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    warnings TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    worker TEXT,
    cancel INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
"""
COLUMNS = ("id", "origin", "state", "settings", "images", "error", "warnings", "created", "started", "finished",
           "worker")
JSON_COLUMNS = ("settings", "images", "warnings")
UNFINISHED = ("queued", "running")


class History:
    """One connection shared by the server's threads behind a lock (SQLite serialises writers anyway)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent after a crash; fsync per checkpoint
        self._db.executescript(SCHEMA)

    def mark_interrupted(self, finished: float) -> int:
        """Jobs left queued or running by a process that died: interrupted. Returns how many."""
        with self._lock:
            cursor = self._db.execute(
                f"UPDATE jobs SET state = 'interrupted', finished = ?, error = ? WHERE state IN {UNFINISHED}",
                (finished, "the server stopped before this job finished"))
            return cursor.rowcount

    def save(self, job: dict[str, Any]) -> None:
        values = [json.dumps(job[c]) if c in JSON_COLUMNS else job.get(c) for c in COLUMNS]
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[1:])  # an upsert keeps the cancel flag
        with self._lock:
            self._db.execute(f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
                             f"ON CONFLICT(id) DO UPDATE SET {updates}", values)

    def get(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _record(row) if row else None

    def list(self, limit: int, offset: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM jobs ORDER BY created DESC, id DESC "
                                    "LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [_record(row) for row in rows]

    def request_cancel(self, job_id: str) -> bool:
        """Ask whichever process runs the job (another Ray Serve replica) to cancel it; False if it is finished."""
        with self._lock:
            cursor = self._db.execute(f"UPDATE jobs SET cancel = 1 WHERE id = ? AND state IN {UNFINISHED}",
                                      (job_id,))
            return cursor.rowcount > 0

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _record(row: tuple) -> dict[str, Any]:
    record = dict(zip(COLUMNS, row, strict=True))
    for c in JSON_COLUMNS:
        record[c] = json.loads(record[c])
    return record
