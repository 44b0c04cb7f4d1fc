-- demo data/generate.py --database: drop a foreign key for the load.
ALTER TABLE {table} DROP CONSTRAINT {name}
