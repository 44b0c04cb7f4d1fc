-- Step 1 of loading one CSV table (db.load_csv_tables): an empty staging copy of the table.
-- The names in braces are identifiers composed with psycopg2.sql.Identifier, never values.
CREATE TEMP TABLE {staging} (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP
