-- Open jobs per state, for the queue depth gauge.
SELECT status, count(*)
FROM recommendation_jobs
WHERE status IN ('queued', 'running')
GROUP BY status
