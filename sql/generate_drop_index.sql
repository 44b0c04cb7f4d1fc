-- demo data/generate.py --database: drop a non-unique index for the load.
DROP INDEX {name}
