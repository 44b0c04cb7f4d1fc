-- Raw features (the columns of songs.sql, in its order) and names of the given catalog songs,
-- by id: the songs a catalog refresh adds to the model's vocabulary (catalog_refresh.py).
SELECT s.song_id, s.album_id, s.artist_id, s.explicit::integer AS explicit,
       s.danceability, s.energy, s.key, s.loudness, s.mode, s.speechiness, s.acousticness,
       s.instrumentalness, s.liveness, s.valence, s.tempo, s.duration_ms, s.time_signature,
       s.disc_number, s.track_number,
       s.name AS song, ar.name AS artist, al.name AS album
FROM songs AS s
LEFT JOIN artists AS ar ON ar.artist_id = s.artist_id
LEFT JOIN albums AS al ON al.album_id = s.album_id
WHERE s.song_id = ANY(%(song_ids)s::bigint[])
ORDER BY s.song_id
