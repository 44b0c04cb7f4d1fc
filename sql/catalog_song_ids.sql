-- Catalog song ids above a bound, by id: what a catalog refresh checks against the model's
-- vocabulary (catalog_refresh.py). An index range scan on the primary key.
SELECT song_id FROM songs WHERE song_id > %(after)s ORDER BY song_id
