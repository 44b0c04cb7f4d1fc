-- demo data/generate.py --database: the foreign keys of one table, to drop during the bulk load
-- and rebuild (validated) after it.
SELECT conname, pg_get_constraintdef(oid)
FROM pg_constraint
WHERE contype = 'f' AND conrelid = %(table)s::regclass
ORDER BY conname
