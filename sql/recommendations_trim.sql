-- Delete old ranks beyond the new result's length, so a playlist holds exactly its latest top-k.
DELETE FROM recommendations AS stored
USING unnest(%(playlist_ids)s::bigint[], %(counts)s::integer[]) AS fresh(playlist_id, n)
WHERE stored.playlist_id = fresh.playlist_id
  AND stored.rank > fresh.n
