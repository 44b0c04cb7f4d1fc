-- Step 2: COPY the CSV file, columns in the order of its header line, into the staging table.
COPY {staging} ({columns}) FROM STDIN WITH (FORMAT csv, HEADER true)
