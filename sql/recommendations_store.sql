-- Upsert ranked recommendations of several playlists at once (one row per playlist and rank).
INSERT INTO recommendations AS stored (playlist_id, rank, song_id, score, model_version, created_at)
SELECT fresh.playlist_id, fresh.rank, fresh.song_id, fresh.score, %(model_version)s, now()
FROM unnest(%(playlist_ids)s::bigint[], %(ranks)s::smallint[], %(song_ids)s::bigint[],
            %(scores)s::real[]) AS fresh(playlist_id, rank, song_id, score)
ON CONFLICT (playlist_id, rank) DO UPDATE
SET song_id = EXCLUDED.song_id,
    score = EXCLUDED.score,
    model_version = EXCLUDED.model_version,
    created_at = EXCLUDED.created_at
