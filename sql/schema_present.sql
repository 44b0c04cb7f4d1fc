-- True when the service schema is installed: the job table and the enqueue function (readiness).
SELECT to_regclass('recommendation_jobs') IS NOT NULL
   AND to_regprocedure('request_recommendations(bigint, integer)') IS NOT NULL
