"""The durable recommendation queue's statements: every job and result statement behind a small
function returning dataclasses (enqueue, get, claim, complete, fail, release, reclaim, depth,
prune, listen, store and read rankings).

The database host enqueues a playlist (``SELECT request_recommendations(42)`` or the HTTP API);
workers (workers.py) claim due jobs with ``FOR UPDATE SKIP LOCKED`` and store the top-k together
with the job's new state in one transaction. (job_id, attempts) fences every update, so a worker
whose lease expired never overwrites the new owner. No threads, no model, nothing about HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg2.errors
from psycopg2.extensions import cursor as Cursor

from config import Settings
from db import fetch_one, sql_text

# -- rows ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    """A job this worker holds; (job_id, attempts) is its fencing token."""

    job_id: int
    playlist_id: int
    k: int
    attempts: int


@dataclass(frozen=True)
class JobState:
    """A job row as GET /jobs/<job_id> shows it."""

    job_id: int
    playlist_id: int
    k: int
    status: str
    attempts: int
    last_error: str | None
    run_after: datetime
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class Failure:
    """A job that could not be scored, with the reason stored in ``last_error``."""

    job: ClaimedJob
    reason: str
    permanent: bool


@dataclass(frozen=True)
class Ranked:
    """Top-k catalog song ids with scores for one playlist."""

    playlist_id: int
    song_ids: list[int]
    scores: list[float]


@dataclass(frozen=True)
class StoredRanking:
    """A playlist's stored top-k with the model version and the newest write time."""

    playlist_id: int
    model_version: str
    created_at: datetime
    song_ids: list[int]
    scores: list[float]


# -- statements ---------------------------------------------------------------------------------


class PlaylistNotFound(LookupError):
    """An enqueue named a playlist that is not in ``playlists``; no job was made."""


def enqueue(cursor: Cursor, playlist_id: int, k: int) -> int:
    """Commit-ready job for a playlist (or its already open one, a queued one taking ``k``);
    returns the job id, or raises PlaylistNotFound for an unknown playlist."""
    try:
        cursor.execute(sql_text("jobs_enqueue"), {"playlist_id": playlist_id, "k": k})
    except psycopg2.errors.NoDataFound as error:
        raise PlaylistNotFound(f"playlist {playlist_id} not found") from error
    return int(fetch_one(cursor)[0])


def get(cursor: Cursor, job_id: int) -> JobState | None:
    """One job's state, or None."""
    cursor.execute(sql_text("jobs_get"), {"job_id": job_id})
    row = cursor.fetchone()
    return None if row is None else JobState(*row)


def claim(cursor: Cursor, worker: str, lease_seconds: float, batch_size: int) -> list[ClaimedJob]:
    """Claim up to ``batch_size`` due jobs for ``worker`` under a lease."""
    cursor.execute(sql_text("jobs_claim"), {"worker": worker, "lease_seconds": lease_seconds,
                                            "batch_size": batch_size})
    return [ClaimedJob(*row) for row in cursor.fetchall()]


def complete(cursor: Cursor, claimed: Sequence[ClaimedJob]) -> set[int]:
    """Mark jobs done where the claim is still ours; the ids that were."""
    cursor.execute(sql_text("jobs_complete"), _tokens(claimed))
    return {row[0] for row in cursor.fetchall()}


def fail(cursor: Cursor, failures: Sequence[Failure], settings: Settings) -> dict[int, str]:
    """Record failures (queued again with backoff, or failed); job id -> its new status."""
    cursor.execute(sql_text("jobs_fail"), {
        "job_ids": [failure.job.job_id for failure in failures],
        "attempts": [failure.job.attempts for failure in failures],
        "reasons": [failure.reason for failure in failures],
        "permanent": [failure.permanent for failure in failures],
        "max_attempts": settings.max_attempts,
        "retry_base_seconds": settings.retry_base_seconds,
        "retry_max_seconds": settings.retry_max_seconds,
    })
    return {job_id: status for job_id, status in cursor.fetchall()}


def release(cursor: Cursor, claimed: Sequence[ClaimedJob]) -> int:
    """Give claimed jobs back without counting the attempt (shutdown); how many were ours."""
    cursor.execute(sql_text("jobs_release"), _tokens(claimed))
    return cursor.rowcount


def reclaim(cursor: Cursor, max_attempts: int) -> dict[int, str]:
    """Requeue (or fail) jobs whose lease expired; job id -> its new status."""
    cursor.execute(sql_text("jobs_reclaim"), {"max_attempts": max_attempts})
    return {job_id: status for job_id, status in cursor.fetchall()}


def depth(cursor: Cursor) -> dict[str, int]:
    """Number of queued and running jobs (both present, 0 when none)."""
    cursor.execute(sql_text("jobs_depth"))
    counts = {status: int(count) for status, count in cursor.fetchall()}
    return {status: counts.get(status, 0) for status in ("queued", "running")}


def prune(cursor: Cursor, older_than_seconds: float, limit: int) -> int:
    """Delete up to ``limit`` done or failed jobs that ended long ago; how many."""
    cursor.execute(sql_text("jobs_prune"), {"older_than_seconds": older_than_seconds,
                                            "limit": limit})
    return cursor.rowcount


def listen(cursor: Cursor) -> None:
    """Subscribe this (autocommit) connection to the queue's notifications."""
    cursor.execute(sql_text("jobs_listen"))


def store_rankings(cursor: Cursor, rankings: Sequence[Ranked], model_version: str) -> None:
    """Replace the stored top-k of these playlists (ranks beyond the new length are deleted)."""
    if not rankings:
        return
    cursor.execute(sql_text("recommendations_trim"), {
        "playlist_ids": [item.playlist_id for item in rankings],
        "counts": [len(item.song_ids) for item in rankings],
    })
    rows = [(item.playlist_id, rank, song_id, score) for item in rankings
            for rank, (song_id, score) in enumerate(zip(item.song_ids, item.scores, strict=True),
                                                    start=1)]
    if rows:
        playlist_ids, ranks, song_ids, scores = (list(column) for column in zip(*rows,
                                                                                strict=True))
        cursor.execute(sql_text("recommendations_store"), {
            "playlist_ids": playlist_ids, "ranks": ranks, "song_ids": song_ids,
            "scores": scores, "model_version": model_version,
        })


def stored_ranking(cursor: Cursor, playlist_id: int) -> StoredRanking | None:
    """The stored top-k of a playlist, best first, or None when there is none."""
    cursor.execute(sql_text("recommendations_read"), {"playlist_id": playlist_id})
    rows = cursor.fetchall()
    if not rows:
        return None
    return StoredRanking(playlist_id, rows[0][3], max(row[4] for row in rows),
                         [row[1] for row in rows], [row[2] for row in rows])


def _tokens(claimed: Sequence[ClaimedJob]) -> dict[str, list[int]]:
    """The fencing tokens of claimed jobs as statement parameters."""
    return {"job_ids": [job.job_id for job in claimed],
            "attempts": [job.attempts for job in claimed]}
