-- One job's state, for GET /jobs/<job_id>.
SELECT job_id, playlist_id, k, status, attempts, last_error, run_after, created_at,
       updated_at, finished_at
FROM recommendation_jobs
WHERE job_id = %(job_id)s
