-- Delete up to %(limit)s jobs that ended (done or failed) more than %(older_than_seconds)s
-- seconds ago. Open jobs are never touched, and neither are stored recommendations. A bounded
-- batch keeps each transaction short; SKIP LOCKED leaves rows another session holds alone.
DELETE FROM recommendation_jobs
WHERE job_id IN (
    SELECT job_id
    FROM recommendation_jobs
    WHERE status IN ('done', 'failed')
      AND finished_at < now() - make_interval(secs => %(older_than_seconds)s::double precision)
    ORDER BY finished_at
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
)
