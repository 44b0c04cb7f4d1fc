-- Claim up to batch_size due jobs for one worker. SKIP LOCKED lets many workers, in many
-- processes, share the queue without waiting on each other or taking the same job.
-- attempts counts claims; (job_id, attempts) is the fencing token that complete, fail and
-- release check, so a worker whose lease was reclaimed can never overwrite the new owner.
UPDATE recommendation_jobs AS jobs
SET status = 'running',
    attempts = jobs.attempts + 1,
    worker = %(worker)s,
    lease_expires_at = now() + make_interval(secs => %(lease_seconds)s),
    updated_at = now()
FROM (
    SELECT job_id
    FROM recommendation_jobs
    WHERE status = 'queued' AND run_after <= now()
    ORDER BY run_after, job_id
    LIMIT %(batch_size)s
    FOR UPDATE SKIP LOCKED
) AS due
WHERE jobs.job_id = due.job_id
RETURNING jobs.job_id, jobs.playlist_id, jobs.k, jobs.attempts
