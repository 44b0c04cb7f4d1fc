-- Step 3: insert the staged rows; rows already present are skipped, so loading is idempotent.
INSERT INTO {table} ({columns}) SELECT {columns} FROM {staging} ON CONFLICT DO NOTHING
