-- Song, artist and album names for printing recommendations, by catalog song id.
SELECT s.song_id, s.name AS song, ar.name AS artist, al.name AS album
FROM songs AS s
LEFT JOIN artists AS ar ON ar.artist_id = s.artist_id
LEFT JOIN albums AS al ON al.album_id = s.album_id
ORDER BY s.song_id
