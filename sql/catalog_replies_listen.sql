-- Subscribe `flask refresh-catalog` to the service processes' reports of their refreshes
-- (db.CATALOG_REPLY_CHANNEL).
LISTEN catalog_refreshed
