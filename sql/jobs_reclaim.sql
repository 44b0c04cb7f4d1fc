-- Give back jobs whose worker died (lease expired while running): queued again at once, or
-- failed when they already used every allowed attempt.
UPDATE recommendation_jobs AS jobs
SET status = CASE WHEN jobs.attempts >= %(max_attempts)s THEN 'failed' ELSE 'queued' END,
    last_error = 'lease expired: worker ' || coalesce(jobs.worker, 'unknown')
                 || ' stopped before finishing',
    run_after = now(),
    finished_at = CASE WHEN jobs.attempts >= %(max_attempts)s THEN now() END,
    lease_expires_at = NULL,
    updated_at = now()
FROM (
    SELECT job_id
    FROM recommendation_jobs
    WHERE status = 'running' AND lease_expires_at < now()
    FOR UPDATE SKIP LOCKED
) AS expired
WHERE jobs.job_id = expired.job_id
RETURNING jobs.job_id, jobs.status
