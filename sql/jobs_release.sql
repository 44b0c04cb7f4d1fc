-- Hand claimed but unprocessed jobs back to the queue (graceful shutdown); the claim that
-- was never used does not count as an attempt.
UPDATE recommendation_jobs AS jobs
SET status = 'queued',
    attempts = jobs.attempts - 1,
    run_after = now(),
    lease_expires_at = NULL,
    updated_at = now()
FROM unnest(%(job_ids)s::bigint[], %(attempts)s::integer[]) AS claimed(job_id, attempts)
WHERE jobs.job_id = claimed.job_id
  AND jobs.attempts = claimed.attempts
  AND jobs.status = 'running'
RETURNING jobs.job_id
