-- Optional: refresh a playlist's recommendations whenever its songs change.
-- Install after service.sql:  psql "$DATABASE_URL" -f sql/refresh_trigger.sql
-- Remove with:
--     DROP TRIGGER IF EXISTS playlist_songs_refresh_insert ON playlist_songs;
--     DROP TRIGGER IF EXISTS playlist_songs_refresh_update ON playlist_songs;
--     DROP TRIGGER IF EXISTS playlist_songs_refresh_delete ON playlist_songs;
-- Statement-level triggers: a bulk insert of many rows enqueues one job per changed playlist,
-- and a playlist that already has an open job is not enqueued twice.
-- Bulk loads (COPY of a whole catalog) are faster with the triggers dropped and
-- `flask --app flask_app score-all` afterwards.

CREATE OR REPLACE FUNCTION refresh_recommendations_for_changed_playlists()
RETURNS trigger
LANGUAGE plpgsql
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM request_recommendations(changed.playlist_id)
        FROM (SELECT DISTINCT playlist_id FROM new_rows) AS changed;
    ELSIF TG_OP = 'UPDATE' THEN
        PERFORM request_recommendations(changed.playlist_id)
        FROM (SELECT playlist_id FROM new_rows UNION SELECT playlist_id FROM old_rows) AS changed
        WHERE EXISTS (SELECT 1 FROM playlists WHERE playlists.playlist_id = changed.playlist_id);
    ELSE
        PERFORM request_recommendations(changed.playlist_id)
        FROM (SELECT DISTINCT playlist_id FROM old_rows) AS changed
        WHERE EXISTS (SELECT 1 FROM playlists WHERE playlists.playlist_id = changed.playlist_id);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER playlist_songs_refresh_insert
    AFTER INSERT ON playlist_songs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION refresh_recommendations_for_changed_playlists();

CREATE OR REPLACE TRIGGER playlist_songs_refresh_update
    AFTER UPDATE ON playlist_songs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION refresh_recommendations_for_changed_playlists();

CREATE OR REPLACE TRIGGER playlist_songs_refresh_delete
    AFTER DELETE ON playlist_songs
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION refresh_recommendations_for_changed_playlists();
