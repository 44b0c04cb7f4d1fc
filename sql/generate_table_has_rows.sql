-- demo data/generate.py --database: does a catalog table already hold rows?
SELECT EXISTS (SELECT 1 FROM {table})
