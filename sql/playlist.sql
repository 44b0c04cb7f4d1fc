-- One playlist: whether it exists, and its song ids in playlist order.
SELECT EXISTS (SELECT 1 FROM playlists WHERE playlist_id = %(playlist_id)s) AS found,
       ARRAY(SELECT song_id FROM playlist_songs
             WHERE playlist_id = %(playlist_id)s ORDER BY pos) AS song_ids
