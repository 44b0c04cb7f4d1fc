-- demo data/generate.py --database: fresh planner statistics after the load.
ANALYZE {table}
