-- Subscribe the workers' listener to catalog refresh requests (sql/catalog_trigger.sql and
-- `flask refresh-catalog` notify this channel; db.CATALOG_CHANNEL).
LISTEN catalog_songs
