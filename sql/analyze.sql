-- Fresh planner statistics for a table just bulk-loaded (db.load_csv_tables, demo data/generate.py
-- --database). Without them, until autovacuum gets to it, the planner reads a batch of
-- playlists by scanning all of playlist_songs (253 ms for 2.26M rows, against 0.5 ms by index).
ANALYZE {table}
