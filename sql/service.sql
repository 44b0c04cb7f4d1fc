-- Service objects of Bert4MusicRec, installed by `flask --app flask_app init-db` after schema.sql.
-- Idempotent: safe to run again.
--
-- The database host enqueues from SQL alone:
--     SELECT request_recommendations(42);          -- top 10, returns the job id
--     SELECT request_recommendations(42, 25);      -- top 25
-- The new job is committed with the caller's transaction and announced with
-- NOTIFY recommendation_jobs; the service's workers LISTEN and wake at once (they also poll).
-- A second request while the playlist's job is queued or running returns that job's id.
-- The result lands in recommendations (playlist_id, rank, song_id, score, model_version).

CREATE OR REPLACE FUNCTION request_recommendations(playlist_id bigint, k integer DEFAULT 10)
RETURNS bigint
LANGUAGE plpgsql
VOLATILE
AS $$
#variable_conflict use_column
DECLARE
    found_job_id bigint;
BEGIN
    IF request_recommendations.playlist_id IS NULL THEN
        RAISE EXCEPTION 'playlist_id must not be null' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF request_recommendations.k IS NULL OR request_recommendations.k NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'k must be between 1 and 100, got %', request_recommendations.k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    LOOP
        INSERT INTO recommendation_jobs AS jobs (playlist_id, k, status)
        VALUES (request_recommendations.playlist_id, request_recommendations.k, 'queued')
        ON CONFLICT (playlist_id) WHERE status IN ('queued', 'running') DO NOTHING
        RETURNING jobs.job_id INTO found_job_id;
        IF found_job_id IS NOT NULL THEN
            PERFORM pg_notify('recommendation_jobs', found_job_id::text);
            RETURN found_job_id;
        END IF;
        -- The playlist already has an open job; it may finish before we read it, then try again.
        SELECT jobs.job_id INTO found_job_id
        FROM recommendation_jobs AS jobs
        WHERE jobs.playlist_id = request_recommendations.playlist_id
          AND jobs.status IN ('queued', 'running');
        IF found_job_id IS NOT NULL THEN
            RETURN found_job_id;
        END IF;
    END LOOP;
END;
$$;

COMMENT ON FUNCTION request_recommendations(bigint, integer) IS
    'Enqueue (idempotently) a recommendation job for a playlist and NOTIFY the workers; returns the job id.';
