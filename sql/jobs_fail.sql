-- Record a failure with its reason. A permanent failure, or the last allowed attempt, ends the
-- job as failed; otherwise it is queued again after an exponential backoff:
-- retry_base_seconds * 2^(attempts - 1), at most retry_max_seconds.
UPDATE recommendation_jobs AS jobs
SET status = CASE WHEN failed.permanent OR jobs.attempts >= %(max_attempts)s
                  THEN 'failed' ELSE 'queued' END,
    last_error = failed.reason,
    run_after = now() + make_interval(secs => least(
        %(retry_max_seconds)s::double precision,
        %(retry_base_seconds)s::double precision * power(2, greatest(jobs.attempts - 1, 0)))),
    finished_at = CASE WHEN failed.permanent OR jobs.attempts >= %(max_attempts)s
                       THEN now() END,
    lease_expires_at = NULL,
    updated_at = now()
FROM unnest(%(job_ids)s::bigint[], %(attempts)s::integer[], %(reasons)s::text[],
            %(permanent)s::boolean[]) AS failed(job_id, attempts, reason, permanent)
WHERE jobs.job_id = failed.job_id
  AND jobs.attempts = failed.attempts
  AND jobs.status = 'running'
RETURNING jobs.job_id, jobs.status
