-- Number of catalog songs and the highest song id, for `flask refresh-catalog`'s report.
SELECT count(*), max(song_id) FROM songs
