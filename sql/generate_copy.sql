-- demo data/generate.py --database: COPY one generated table, chunk by chunk (CSV rows, no header).
-- The names in braces are identifiers composed with psycopg2.sql.Identifier, never values.
COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)
