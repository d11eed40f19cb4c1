"""The depth-control actor's durable state on SQLite (stdlib): budget checkpoints, finished requests
(for feedback), feedback, live per-domain thresholds and human reviews.

Values are JSON text; nothing is ever pickled. One connection behind a lock: the actor is the file's
only user, and Ray may call it from more than one thread. Contract violations an API user can cause
raise `StateError` subclasses with messages fit to show them; SQLite I/O errors propagate as
`sqlite3.Error` (the caller reports those as "unavailable", not as the user's fault).
"""

from __future__ import annotations

import fcntl
import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
REVIEW_STATUSES = ("pending", "approved", "rejected")

# Feedback copies the request's signals, so it outlives request retention (thresholds learn from it).
_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version SELECT {SCHEMA_VERSION} WHERE NOT EXISTS (SELECT 1 FROM schema_version);
CREATE TABLE IF NOT EXISTS checkpoints (key TEXT PRIMARY KEY, value TEXT NOT NULL, saved_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY, domain TEXT NOT NULL, tier TEXT NOT NULL, strategy TEXT NOT NULL,
    exit_reason TEXT NOT NULL, confidence REAL, rounds INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, recorded_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS requests_recorded_at ON requests (recorded_at);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY, domain TEXT NOT NULL, tier TEXT NOT NULL, confidence REAL,
    exit_reason TEXT NOT NULL, rounds INTEGER NOT NULL, correct INTEGER NOT NULL, given_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS feedback_domain ON feedback (domain, given_at);
CREATE TABLE IF NOT EXISTS thresholds (
    domain TEXT PRIMARY KEY, value REAL NOT NULL, source TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS reviews (
    id TEXT PRIMARY KEY, request_id TEXT NOT NULL, tier TEXT NOT NULL, domain TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, decided_at REAL, reviewer TEXT, note TEXT,
    proposed TEXT NOT NULL, completion TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS reviews_status ON reviews (status, created_at);
COMMIT;
"""


class StateError(Exception):
    """A state operation that cannot be done; the message is fit for an API user."""


class UnknownRequestError(StateError):
    """No finished request with that id (never recorded, or past retention)."""


class FeedbackExistsError(StateError):
    """Feedback is once per request."""


class ReviewNotFoundError(StateError):
    """No review with that id."""


class ReviewDecidedError(StateError):
    """The review was already approved or rejected."""


@contextmanager
def _opening(path: Path) -> Iterator[None]:
    """An exclusive lock on `<state file>.lock` while a process sets the file up."""
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class StateStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StateError(f"cannot open Ponder state file {self.path}: {exc}") from exc
        try:
            self._db.row_factory = sqlite3.Row
            # Two actors open the file at once at start-up (depth control, records). Switching to WAL
            # and creating the schema take the write lock in ways SQLite refuses at once (SQLITE_BUSY,
            # no busy wait) when another connection does the same: one opener at a time.
            with _opening(self.path):
                self._db.execute("PRAGMA journal_mode=WAL")  # the first read: junk fails here
                self._db.execute("PRAGMA synchronous=NORMAL")  # WAL keeps it consistent; may lose the last ms
                self._check_version()
                self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StateError(f"{self.path} is not a usable Ponder state file: {exc}") from exc
        except StateError:
            self._db.close()
            raise

    def _check_version(self) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return  # a new file
        if "schema_version" not in tables:
            raise StateError(f"{self.path} is an SQLite file but not a Ponder state file; move it away")
        version = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if version is not None and version > SCHEMA_VERSION:
            raise StateError(
                f"{self.path} has state schema {version}, newer than this Ponder's {SCHEMA_VERSION}: "
                "upgrade Ponder or point depth_control.state_dir elsewhere"
            )

    def _q(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Several statements as one transaction, and no other thread in between."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, key: str, value: dict, now: float) -> None:
        self._q(
            "INSERT INTO checkpoints VALUES (?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value=excluded.value, saved_at=excluded.saved_at",
            (key, json.dumps(value), now),
        )

    def load_checkpoint(self, key: str) -> dict | None:
        rows = self._q("SELECT value FROM checkpoints WHERE key=?", (key,))
        return json.loads(rows[0]["value"]) if rows else None

    # --- requests and feedback ---------------------------------------------------------------

    def record_request(
        self,
        request_id: str,
        *,
        domain: str,
        tier: str,
        strategy: str,
        exit_reason: str,
        confidence: float | None,
        rounds: int,
        completion_tokens: int,
        now: float,
    ) -> None:
        """Remember a finished request for later feedback; recording it again (a retry) replaces it."""
        self._q(
            "INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (request_id, domain, tier, strategy, exit_reason, confidence, rounds, completion_tokens, now),
        )

    def get_request(self, request_id: str) -> dict | None:
        rows = self._q("SELECT * FROM requests WHERE id=?", (request_id,))
        return dict(rows[0]) if rows else None

    def prune_requests(self, older_than: float) -> int:
        """Retention: forget requests recorded before `older_than`; their feedback rows stay."""
        with self._lock:
            return self._db.execute("DELETE FROM requests WHERE recorded_at < ?", (older_than,)).rowcount

    def add_feedback(self, request_id: str, correct: bool, now: float) -> dict:
        with self._tx() as db:
            req = db.execute("SELECT * FROM requests WHERE id=?", (request_id,)).fetchone()
            if req is None:
                raise UnknownRequestError(
                    f"no finished request {request_id!r}: feedback names the id of a completed chat "
                    "completion (held reviews and requests older than the retention have none)"
                )
            row = {
                "request_id": request_id,
                "domain": req["domain"],
                "tier": req["tier"],
                "confidence": req["confidence"],
                "exit_reason": req["exit_reason"],
                "rounds": req["rounds"],
                "correct": bool(correct),
                "given_at": now,
            }
            try:
                db.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?)", tuple(row.values()))
            except sqlite3.IntegrityError as exc:
                raise FeedbackExistsError(
                    f"feedback for request {request_id!r} was already given (feedback is once per request)"
                ) from exc
        return row

    def domain_feedback(self, domain: str, limit: int = 500) -> list[dict]:
        """The domain's feedback, newest first."""
        rows = self._q(
            "SELECT * FROM feedback WHERE domain=? ORDER BY given_at DESC, rowid DESC LIMIT ?",
            (domain, max(0, limit)),
        )
        return [{**dict(r), "correct": bool(r["correct"])} for r in rows]

    # --- thresholds --------------------------------------------------------------------------

    def set_threshold(self, domain: str, value: float, *, source: str, now: float) -> None:
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"a confidence threshold is in [0, 1], got {value!r}")
        self._q("INSERT OR REPLACE INTO thresholds VALUES (?, ?, ?, ?)", (domain, value, source, now))

    def thresholds(self) -> dict[str, dict]:
        rows = self._q("SELECT * FROM thresholds")
        return {
            r["domain"]: {"value": r["value"], "source": r["source"], "updated_at": r["updated_at"]}
            for r in rows
        }

    # --- reviews -----------------------------------------------------------------------------

    def create_review(
        self,
        review_id: str,
        *,
        request_id: str,
        tier: str,
        domain: str,
        proposed: dict,
        completion: dict,
        now: float,
    ) -> dict:
        """A pending review. Idempotent for the same request: Ray retries a call whose actor died."""
        args = (review_id, request_id, tier, domain, now, json.dumps(proposed), json.dumps(completion))
        with self._tx() as db:
            db.execute(
                "INSERT INTO reviews VALUES (?, ?, ?, ?, 'pending', ?, NULL, NULL, NULL, ?, ?) "
                "ON CONFLICT(id) DO NOTHING",
                args,
            )
            row = db.execute("SELECT * FROM reviews WHERE id=?", (review_id,)).fetchone()
        if row["request_id"] != request_id:
            raise StateError(f"review {review_id!r} already exists for another request")
        return _review(row)

    def pending_reviews(self) -> tuple[int, float | None]:
        """(reviews waiting for a human, when the oldest of them was created; None when none)."""
        ((count, oldest),) = self._q(
            "SELECT COUNT(*), MIN(created_at) FROM reviews WHERE status='pending'", ()
        )
        return int(count), None if oldest is None else float(oldest)

    def get_review(self, review_id: str) -> dict | None:
        rows = self._q("SELECT * FROM reviews WHERE id=?", (review_id,))
        return _review(rows[0]) if rows else None

    def list_reviews(self, status: str | None = None, limit: int = 100) -> list[dict]:
        """Reviews newest first, optionally only those with one status."""
        if status is not None and status not in REVIEW_STATUSES:
            raise StateError(f"unknown review status {status!r}; one of {', '.join(REVIEW_STATUSES)}")
        where, args = ("", ()) if status is None else ("WHERE status=? ", (status,))
        rows = self._q(
            f"SELECT * FROM reviews {where}ORDER BY created_at DESC, rowid DESC LIMIT ?",
            (*args, max(0, limit)),
        )
        return [_review(r) for r in rows]

    def decide_review(
        self, review_id: str, *, approve: bool, reviewer: str | None, note: str | None, now: float
    ) -> dict:
        status = "approved" if approve else "rejected"
        with self._tx() as db:
            # Conditional on 'pending': of two racing decisions exactly one changes the row.
            changed = db.execute(
                "UPDATE reviews SET status=?, decided_at=?, reviewer=?, note=? "
                "WHERE id=? AND status='pending'",
                (status, now, reviewer, note, review_id),
            ).rowcount
            row = db.execute("SELECT * FROM reviews WHERE id=?", (review_id,)).fetchone()
        if row is None:
            raise ReviewNotFoundError(f"no review {review_id!r}")
        if not changed:
            raise ReviewDecidedError(
                f"review {review_id!r} was already {row['status']}; a review is decided once"
            )
        return _review(row)


def _review(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["proposed"] = json.loads(d["proposed"])
    d["completion"] = json.loads(d["completion"])
    return d
