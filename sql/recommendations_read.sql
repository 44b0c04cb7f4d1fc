-- Stored recommendations of one playlist, best first.
SELECT rank, song_id, score, model_version, created_at
FROM recommendations
WHERE playlist_id = %(playlist_id)s
ORDER BY rank
