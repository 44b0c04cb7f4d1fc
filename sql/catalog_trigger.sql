-- Optional: tell the running service when songs enter the catalog, so that every process
-- extends its model's vocabulary with them at once (catalog_refresh.py), without a restart.
-- Install after service.sql:  flask --app flask_app init-db --catalog-trigger
--                       (or:  psql "$DATABASE_URL" -f sql/catalog_trigger.sql)
-- Remove with:
--     DROP TRIGGER IF EXISTS songs_catalog_insert ON songs;
-- Statement-level: a bulk INSERT (or COPY) of many songs sends one NOTIFY catalog_songs, at
-- commit, whose payload is the lowest song_id it inserted, so the service reads the songs from
-- there on only; the service also coalesces notifications that arrive while it refreshes.
-- Updates of existing songs are not announced: a song's vectors are fixed once it is known.

CREATE OR REPLACE FUNCTION notify_catalog_songs_added()
RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    lowest bigint;
BEGIN
    SELECT min(song_id) INTO lowest FROM new_rows;
    IF lowest IS NOT NULL THEN
        PERFORM pg_notify('catalog_songs', lowest::text);
    END IF;
    RETURN NULL;
END;
$$;

CREATE OR REPLACE TRIGGER songs_catalog_insert
    AFTER INSERT ON songs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION notify_catalog_songs_added();
