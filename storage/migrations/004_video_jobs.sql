-- Video analysis jobs: the queue and the results. A job is queued by the
-- API, claimed by a VideoProcessor (FOR UPDATE SKIP LOCKED), and ends done or
-- failed. A processor that dies leaves its job running; its successor puts
-- it back in the queue, and a video that crashes processors three times fails.
CREATE TABLE video_jobs (
    job_id text PRIMARY KEY,
    user_id text NOT NULL,
    source_path text NOT NULL,
    status text NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    progress real NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    attempts integer NOT NULL DEFAULT 0,
    result jsonb,
    error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'done') = (result IS NOT NULL)),
    CHECK ((status = 'failed') = (error IS NOT NULL))
);
CREATE INDEX video_jobs_queue ON video_jobs (created_at) WHERE status = 'queued';
