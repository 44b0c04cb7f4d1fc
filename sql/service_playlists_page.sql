-- One page of playlists with their songs, in playlist id order (keyset pagination for score-all).
WITH page AS (
    SELECT playlist_id
    FROM playlists
    WHERE playlist_id > %(after)s
    ORDER BY playlist_id
    LIMIT %(limit)s
)
SELECT page.playlist_id,
       coalesce(array_agg(entries.song_id ORDER BY entries.pos)
                    FILTER (WHERE entries.song_id IS NOT NULL),
                ARRAY[]::bigint[]) AS song_ids
FROM page
LEFT JOIN playlist_songs AS entries ON entries.playlist_id = page.playlist_id
GROUP BY page.playlist_id
ORDER BY page.playlist_id
