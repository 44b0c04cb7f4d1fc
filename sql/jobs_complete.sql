-- Mark claimed jobs done, only where the claim is still ours (same attempts, still running).
-- Runs in the transaction that stores the results: both happen, or neither.
UPDATE recommendation_jobs AS jobs
SET status = 'done',
    finished_at = now(),
    lease_expires_at = NULL,
    updated_at = now()
FROM unnest(%(job_ids)s::bigint[], %(attempts)s::integer[]) AS claimed(job_id, attempts)
WHERE jobs.job_id = claimed.job_id
  AND jobs.attempts = claimed.attempts
  AND jobs.status = 'running'
RETURNING jobs.job_id
