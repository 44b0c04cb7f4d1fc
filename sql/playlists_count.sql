-- Number of rows sql/playlists.sql returns (every playlist_songs row), to preallocate arrays.
SELECT count(*) FROM playlist_songs
