-- demo data/generate.py --database: the non-unique indexes of one table, built once after the load.
SELECT c.relname, pg_get_indexdef(x.indexrelid)
FROM pg_index x
JOIN pg_class c ON c.oid = x.indexrelid
WHERE x.indrelid = %(table)s::regclass AND NOT x.indisunique
ORDER BY c.relname
