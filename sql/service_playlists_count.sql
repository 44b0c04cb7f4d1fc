-- Number of playlists, for score-all's progress bar.
SELECT count(*) FROM playlists
