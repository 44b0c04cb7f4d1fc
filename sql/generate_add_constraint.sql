-- demo data/generate.py --database: re-add a foreign key after the load, its definition the text
-- pg_get_constraintdef returned for it before the drop.
ALTER TABLE {table} ADD CONSTRAINT {name} {definition}
