-- Enqueue a job idempotently (see service.sql); returns the new or the already open job's id.
SELECT request_recommendations(%(playlist_id)s, %(k)s)
