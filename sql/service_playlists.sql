-- Songs (in order) of the playlists of a claimed batch; a missing playlist has no row.
SELECT playlists.playlist_id,
       coalesce(array_agg(entries.song_id ORDER BY entries.pos)
                    FILTER (WHERE entries.song_id IS NOT NULL),
                ARRAY[]::bigint[]) AS song_ids
FROM playlists
LEFT JOIN playlist_songs AS entries ON entries.playlist_id = playlists.playlist_id
WHERE playlists.playlist_id = ANY(%(playlist_ids)s::bigint[])
GROUP BY playlists.playlist_id
