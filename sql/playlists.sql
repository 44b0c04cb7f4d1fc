-- Every playlist's songs in playlist order, streamed by preprocessing.py (server-side cursor).
SELECT playlist_id, pos, song_id
FROM playlist_songs
ORDER BY playlist_id, pos
