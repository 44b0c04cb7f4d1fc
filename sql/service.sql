-- Service objects of Bert4MusicRec, installed by `flask --app flask_app init-db` after schema.sql.
-- Idempotent: safe to run again.
--
-- The database host enqueues from SQL alone:
--     SELECT request_recommendations(42);          -- top 10, returns the job id
--     SELECT request_recommendations(42, 25);      -- top 25
-- The new job is committed with the caller's transaction and announced with
-- NOTIFY recommendation_jobs; the service's workers LISTEN and wake at once (they also poll).
-- A second request while the playlist's job is queued or running returns that job's id; a
-- queued job takes the new k, a running one keeps its own (request again once it has ended).
-- It refuses what POST /recommend refuses, with the same bounds: a NULL or negative
-- playlist_id or a k outside 1..100 (invalid_parameter_value), and a playlist that is not in
-- playlists (no_data_found, no job is made).
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
    IF request_recommendations.playlist_id < 0 THEN
        RAISE EXCEPTION 'playlist_id must be between 0 and 9223372036854775807, got %',
            request_recommendations.playlist_id USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF request_recommendations.k IS NULL OR request_recommendations.k NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'k must be between 1 and 100, got %', request_recommendations.k
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM playlists
                   WHERE playlists.playlist_id = request_recommendations.playlist_id) THEN
        RAISE EXCEPTION 'playlist % not found', request_recommendations.playlist_id
            USING ERRCODE = 'no_data_found';
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
        -- A queued job not yet claimed takes this k (a claim that locked it first wins, and the
        -- job is running by the time this statement sees it).
        UPDATE recommendation_jobs AS jobs
        SET k = request_recommendations.k, updated_at = now()
        WHERE jobs.playlist_id = request_recommendations.playlist_id
          AND jobs.status = 'queued' AND jobs.k <> request_recommendations.k
        RETURNING jobs.job_id INTO found_job_id;
        IF found_job_id IS NOT NULL THEN
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
    'Enqueue (idempotently) a recommendation job for an existing playlist and NOTIFY the workers; a queued job takes the new k; returns the job id.';
