"""The SQL of video analysis jobs (migrations 004 and 005)."""

from __future__ import annotations

from typing import NamedTuple

import asyncpg

from .pool import connection

VIDEO_JOBS_NOTIFY_CHANNEL = "dd_video_jobs"  # NOTIFY at enqueue wakes the processor at once
VIDEO_JOB_ATTEMPTS_MAX = 3  # a video that crashed this many processors fails instead of crashing a fourth


class VideoJobRow(NamedTuple):
    job_id: str
    user_id: str
    source_path: str
    status: str
    progress: float
    attempts: int
    result: str | None  # JSON text of a VideoAnalysis
    error: str | None
    created_at: object
    updated_at: object
    variants: bool  # encode the platform variants too (migration 005)


_COLUMNS = ("job_id, user_id, source_path, status, progress, attempts, result::text, error, created_at, updated_at,"
            " variants")


async def enqueue(pool: asyncpg.Pool, job_id: str, user_id: str, source_path: str,
                  variants: bool = False) -> VideoJobRow:
    async with connection(pool) as conn, conn.transaction():
        row = await conn.fetchrow(
            f"INSERT INTO video_jobs (job_id, user_id, source_path, status, variants)"
            f" VALUES ($1, $2, $3, 'queued', $4) RETURNING {_COLUMNS}", job_id, user_id, source_path, variants)
        await conn.execute(f"NOTIFY {VIDEO_JOBS_NOTIFY_CHANNEL}")
    return VideoJobRow(*row)


async def get(pool: asyncpg.Pool, job_id: str) -> VideoJobRow | None:
    async with connection(pool) as conn:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM video_jobs WHERE job_id = $1", job_id)
    return VideoJobRow(*row) if row else None


async def claim_next(pool: asyncpg.Pool) -> VideoJobRow | None:
    """The oldest queued job, now running; None when the queue is empty."""
    row = await pool.fetchrow(
        f"UPDATE video_jobs SET status = 'running', attempts = attempts + 1, progress = 0, updated_at = now()"
        f" WHERE job_id = (SELECT job_id FROM video_jobs WHERE status = 'queued' ORDER BY created_at"
        f"                 FOR UPDATE SKIP LOCKED LIMIT 1)"
        f" RETURNING {_COLUMNS}")
    return VideoJobRow(*row) if row else None


async def requeue_abandoned(pool: asyncpg.Pool) -> tuple[int, int]:
    """At a processor's start: its predecessor's running jobs go back in the
    queue, or fail once they have crashed processors too often. Returns
    (requeued, failed). One processor per deployment: every running job was its."""
    failed = await pool.fetchval(
        "WITH f AS (UPDATE video_jobs SET status = 'failed', updated_at = now(),"
        "  error = 'the video processor stopped ' || attempts || ' times while analysing this video'"
        "  WHERE status = 'running' AND attempts >= $1 RETURNING 1) SELECT count(*) FROM f",
        VIDEO_JOB_ATTEMPTS_MAX)
    requeued = await pool.fetchval(
        "WITH r AS (UPDATE video_jobs SET status = 'queued', updated_at = now()"
        "  WHERE status = 'running' RETURNING 1) SELECT count(*) FROM r")
    return requeued, failed


async def set_progress(pool: asyncpg.Pool, job_id: str, progress: float) -> None:
    await pool.execute("UPDATE video_jobs SET progress = $2, updated_at = now() WHERE job_id = $1 AND status = 'running'",
                       job_id, progress)


async def finish(pool: asyncpg.Pool, job_id: str, result_json: str) -> None:
    await pool.execute(
        "UPDATE video_jobs SET status = 'done', progress = 1, result = $2::jsonb, updated_at = now()"
        " WHERE job_id = $1 AND status = 'running'", job_id, result_json)


async def fail(pool: asyncpg.Pool, job_id: str, error: str) -> None:
    await pool.execute("UPDATE video_jobs SET status = 'failed', error = $2, updated_at = now()"
                       " WHERE job_id = $1 AND status = 'running'", job_id, error)
