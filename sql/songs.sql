-- Raw features of the songs that occur in playlists, by catalog id (preprocessing.py).
SELECT s.song_id, s.album_id, s.artist_id, s.explicit::integer AS explicit,
       s.danceability, s.energy, s.key, s.loudness, s.mode, s.speechiness, s.acousticness,
       s.instrumentalness, s.liveness, s.valence, s.tempo, s.duration_ms, s.time_signature,
       s.disc_number, s.track_number
FROM songs AS s
WHERE EXISTS (SELECT 1 FROM playlist_songs AS ps WHERE ps.song_id = s.song_id)
ORDER BY s.song_id
