-- First statement of a multi-query read (preprocessing.py, catalog names): one consistent,
-- read-only snapshot of every table it reads.
SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY
